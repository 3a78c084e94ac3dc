// Bundles app.ts (and the generated code it imports from clients/typescript)
// into dist/app.js for the browser.
import path from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const here = path.dirname(fileURLToPath(import.meta.url));

// The generated code lives outside this package; its imports of the runtime
// libraries must resolve to this package's node_modules (one copy of each),
// whatever clients/typescript has installed.
const runtimeFromHere = {
  name: "runtime-from-here",
  setup(build) {
    build.onResolve({ filter: /^@(bufbuild|connectrpc)\// }, async (args) => {
      if (args.pluginData === "from-here") {
        return undefined;
      }
      const resolved = await build.resolve(args.path, {
        kind: args.kind,
        resolveDir: here,
        pluginData: "from-here",
      });
      if (resolved.errors.length > 0) {
        return { errors: resolved.errors };
      }
      return { path: resolved.path, namespace: resolved.namespace, sideEffects: resolved.sideEffects };
    });
  },
};

await esbuild.build({
  entryPoints: [path.join(here, "app.ts")],
  bundle: true,
  format: "esm",
  target: "chrome120",
  sourcemap: true,
  outdir: path.join(here, "dist"),
  plugins: [runtimeFromHere],
  logLevel: "warning",
});

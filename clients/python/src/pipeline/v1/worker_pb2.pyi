from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunStepRequest(_message.Message):
    __slots__ = ("execution_id", "pipeline_name", "step_name", "attempt", "config", "data")
    EXECUTION_ID_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_NAME_FIELD_NUMBER: _ClassVar[int]
    STEP_NAME_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    execution_id: str
    pipeline_name: str
    step_name: str
    attempt: int
    config: _struct_pb2.Struct
    data: _struct_pb2.Struct
    def __init__(self, execution_id: _Optional[str] = ..., pipeline_name: _Optional[str] = ..., step_name: _Optional[str] = ..., attempt: _Optional[int] = ..., config: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., data: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class RunStepResponse(_message.Message):
    __slots__ = ("log", "progress", "result")
    LOG_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    log: WorkerLog
    progress: WorkerProgress
    result: WorkerResult
    def __init__(self, log: _Optional[_Union[WorkerLog, _Mapping]] = ..., progress: _Optional[_Union[WorkerProgress, _Mapping]] = ..., result: _Optional[_Union[WorkerResult, _Mapping]] = ...) -> None: ...

class WorkerLog(_message.Message):
    __slots__ = ("line",)
    LINE_FIELD_NUMBER: _ClassVar[int]
    line: str
    def __init__(self, line: _Optional[str] = ...) -> None: ...

class WorkerProgress(_message.Message):
    __slots__ = ("percent", "message")
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    percent: float
    message: str
    def __init__(self, percent: _Optional[float] = ..., message: _Optional[str] = ...) -> None: ...

class WorkerResult(_message.Message):
    __slots__ = ("output", "error")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    output: _struct_pb2.Struct
    error: WorkerError
    def __init__(self, output: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., error: _Optional[_Union[WorkerError, _Mapping]] = ...) -> None: ...

class WorkerError(_message.Message):
    __slots__ = ("message", "kind")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    message: str
    kind: str
    def __init__(self, message: _Optional[str] = ..., kind: _Optional[str] = ...) -> None: ...

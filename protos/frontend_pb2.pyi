from protos import serving_pb2 as _serving_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AddRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "params", "priority", "cache_salt", "eos_token_ids", "owner")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    params: _serving_pb2.SamplingParams
    priority: int
    cache_salt: str
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    owner: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., params: _Optional[_Union[_serving_pb2.SamplingParams, _Mapping]] = ..., priority: _Optional[int] = ..., cache_salt: _Optional[str] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., owner: _Optional[str] = ...) -> None: ...

class AbortById(_message.Message):
    __slots__ = ("request_id", "owner")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    owner: str
    def __init__(self, request_id: _Optional[str] = ..., owner: _Optional[str] = ...) -> None: ...

class StopCompletion(_message.Message):
    __slots__ = ("request_id", "index", "stop_str")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    STOP_STR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    index: int
    stop_str: str
    def __init__(self, request_id: _Optional[str] = ..., index: _Optional[int] = ..., stop_str: _Optional[str] = ...) -> None: ...

class FrontendMessage(_message.Message):
    __slots__ = ("add", "abort", "stop")
    ADD_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    add: _containers.RepeatedCompositeFieldContainer[AddRequest]
    abort: _containers.RepeatedScalarFieldContainer[str]
    stop: _containers.RepeatedCompositeFieldContainer[StopCompletion]
    def __init__(self, add: _Optional[_Iterable[_Union[AddRequest, _Mapping]]] = ..., abort: _Optional[_Iterable[str]] = ..., stop: _Optional[_Iterable[_Union[StopCompletion, _Mapping]]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class Finished(_message.Message):
    __slots__ = ("request_id", "index", "finish_reason", "stop_str", "stop_token_id", "usage", "timings", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_STR_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    index: int
    finish_reason: str
    stop_str: str
    stop_token_id: int
    usage: _serving_pb2.Usage
    timings: _serving_pb2.Timings
    error: Error
    def __init__(self, request_id: _Optional[str] = ..., index: _Optional[int] = ..., finish_reason: _Optional[str] = ..., stop_str: _Optional[str] = ..., stop_token_id: _Optional[int] = ..., usage: _Optional[_Union[_serving_pb2.Usage, _Mapping]] = ..., timings: _Optional[_Union[_serving_pb2.Timings, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class StepOutputs(_message.Message):
    __slots__ = ("request_ids", "indices", "token_ids", "logprobs", "finished")
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    indices: _containers.RepeatedScalarFieldContainer[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedCompositeFieldContainer[_serving_pb2.TokenLogprobs]
    finished: _containers.RepeatedCompositeFieldContainer[Finished]
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ..., indices: _Optional[_Iterable[int]] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[_Union[_serving_pb2.TokenLogprobs, _Mapping]]] = ..., finished: _Optional[_Iterable[_Union[Finished, _Mapping]]] = ...) -> None: ...

class CoreMessage(_message.Message):
    __slots__ = ("ready", "outputs", "serving")
    READY_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    ready: _serving_pb2.ModelInfoResponse
    outputs: StepOutputs
    serving: bool
    def __init__(self, ready: _Optional[_Union[_serving_pb2.ModelInfoResponse, _Mapping]] = ..., outputs: _Optional[_Union[StepOutputs, _Mapping]] = ..., serving: _Optional[bool] = ...) -> None: ...

from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Dtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[Dtype]
    FLOAT16: _ClassVar[Dtype]
    FLOAT32: _ClassVar[Dtype]

class RowStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROW_STATUS_UNSPECIFIED: _ClassVar[RowStatus]
    HIT: _ClassVar[RowStatus]
    MISS: _ClassVar[RowStatus]
    STALE: _ClassVar[RowStatus]

class RowTier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROW_TIER_UNSPECIFIED: _ClassVar[RowTier]
    TIER_PAIR: _ClassVar[RowTier]
    TIER_USER: _ClassVar[RowTier]
    TIER_ITEM: _ClassVar[RowTier]
    TIER_GLOBAL: _ClassVar[RowTier]
    TIER_NONE: _ClassVar[RowTier]

class MissFill(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MISS_FILL_UNSPECIFIED: _ClassVar[MissFill]
    ENRICHED: _ClassVar[MissFill]
    PLAIN: _ClassVar[MissFill]
DTYPE_UNSPECIFIED: Dtype
FLOAT16: Dtype
FLOAT32: Dtype
ROW_STATUS_UNSPECIFIED: RowStatus
HIT: RowStatus
MISS: RowStatus
STALE: RowStatus
ROW_TIER_UNSPECIFIED: RowTier
TIER_PAIR: RowTier
TIER_USER: RowTier
TIER_ITEM: RowTier
TIER_GLOBAL: RowTier
TIER_NONE: RowTier
MISS_FILL_UNSPECIFIED: MissFill
ENRICHED: MissFill
PLAIN: MissFill

class GetRequest(_message.Message):
    __slots__ = ("user_id", "item_id", "dtype", "miss_fill")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MISS_FILL_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    item_id: str
    dtype: Dtype
    miss_fill: MissFill
    def __init__(self, user_id: _Optional[str] = ..., item_id: _Optional[str] = ..., dtype: _Optional[_Union[Dtype, str]] = ..., miss_fill: _Optional[_Union[MissFill, str]] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("dim", "dtype", "embedding", "status", "model_version", "age_ms", "tier")
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    AGE_MS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    dim: int
    dtype: Dtype
    embedding: bytes
    status: RowStatus
    model_version: str
    age_ms: int
    tier: RowTier
    def __init__(self, dim: _Optional[int] = ..., dtype: _Optional[_Union[Dtype, str]] = ..., embedding: _Optional[bytes] = ..., status: _Optional[_Union[RowStatus, str]] = ..., model_version: _Optional[str] = ..., age_ms: _Optional[int] = ..., tier: _Optional[_Union[RowTier, str]] = ...) -> None: ...

class BatchGetRequest(_message.Message):
    __slots__ = ("user_id", "item_ids", "dtype", "miss_fill")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MISS_FILL_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    dtype: Dtype
    miss_fill: MissFill
    def __init__(self, user_id: _Optional[str] = ..., item_ids: _Optional[_Iterable[str]] = ..., dtype: _Optional[_Union[Dtype, str]] = ..., miss_fill: _Optional[_Union[MissFill, str]] = ...) -> None: ...

class BatchGetResponse(_message.Message):
    __slots__ = ("dim", "dtype", "embeddings", "statuses", "model_version", "ages_ms", "tiers")
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    AGES_MS_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    dim: int
    dtype: Dtype
    embeddings: bytes
    statuses: _containers.RepeatedScalarFieldContainer[RowStatus]
    model_version: str
    ages_ms: _containers.RepeatedScalarFieldContainer[int]
    tiers: _containers.RepeatedScalarFieldContainer[RowTier]
    def __init__(self, dim: _Optional[int] = ..., dtype: _Optional[_Union[Dtype, str]] = ..., embeddings: _Optional[bytes] = ..., statuses: _Optional[_Iterable[_Union[RowStatus, str]]] = ..., model_version: _Optional[str] = ..., ages_ms: _Optional[_Iterable[int]] = ..., tiers: _Optional[_Iterable[_Union[RowTier, str]]] = ...) -> None: ...

class PrefetchRequest(_message.Message):
    __slots__ = ("user_id", "item_ids", "history", "priority")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    history: _containers.RepeatedScalarFieldContainer[str]
    priority: int
    def __init__(self, user_id: _Optional[str] = ..., item_ids: _Optional[_Iterable[str]] = ..., history: _Optional[_Iterable[str]] = ..., priority: _Optional[int] = ...) -> None: ...

class PrefetchResponse(_message.Message):
    __slots__ = ("queued", "already_fresh")
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    ALREADY_FRESH_FIELD_NUMBER: _ClassVar[int]
    queued: int
    already_fresh: int
    def __init__(self, queued: _Optional[int] = ..., already_fresh: _Optional[int] = ...) -> None: ...

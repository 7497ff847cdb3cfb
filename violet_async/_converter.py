"""The one cattrs converter, built by one function; every hook is registered here.

Reading is strict about types and lenient about shape: an amount that arrives as
``"10"`` or ``10.5`` is an error (never silently ``int()``-ed, this is money), while
unknown keys are ignored and unknown enum values are kept.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import attrs
import orjson
from cattrs import ClassValidationError, Converter, IterableValidationError, transform_error
from cattrs.errors import IterableValidationNote
from cattrs.gen import make_dict_structure_fn, override

from .exceptions import RequestValidationError, ResponseFormatError
from .models import (
    BagCancellation,
    BagStatus,
    CancelBagRequest,
    CancelStatus,
    Order,
    OrderBag,
    OrderCancellation,
    OrderRefund,
    OrderSku,
    ReasonCode,
    RefundBagRequest,
    RefundedSku,
    RefundError,
    RefundShipping,
    RefundStatus,
    ShippingRefund,
    SkuRefund,
)
from .models.enums import _OpenEnum

__all__ = ["converter", "decode", "encode_request", "parse_datetime", "request_from_dict"]

T = TypeVar("T")

# Nested models first: a request's generated encoder looks its fields' hooks up once, when
# it is built, so SkuRefund's None-omitting hook must exist before RefundBagRequest's.
_REQUEST_TYPES = (SkuRefund, ShippingRefund, RefundBagRequest, CancelBagRequest)
_RESPONSE_TYPES = frozenset(
    {
        OrderRefund,
        RefundedSku,
        RefundError,
        RefundShipping,
        BagCancellation,
        OrderCancellation,
        Order,
        OrderBag,
        OrderSku,
    }
)
NoneType = type(None)
# "+0000" -> "+00:00" so Python 3.10's fromisoformat reads it too.
_COMPACT_OFFSET = re.compile(r"([+-]\d\d)(\d\d)$")


def parse_datetime(value: str) -> datetime:
    """Read Violet's three date shapes (``...Z``, ``...+0000``, ``....000Z``) into an
    aware datetime. A date without an offset stays naive: it is in the server's local
    time, which nobody told us, so it is never guessed to be UTC (reconciliation treats
    such a date as unknown)."""
    try:
        # Python 3.11+ reads all three shapes directly; the rewrite below is for 3.10.
        return datetime.fromisoformat(value)
    except ValueError:
        return _parse_datetime_compat(value)


def _parse_datetime_compat(value: str) -> datetime:
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    else:
        text = _COMPACT_OFFSET.sub(r"\1:\2", text)
    return datetime.fromisoformat(text)


def _strict(kind: type[Any]) -> Callable[[Any, Any], Any]:
    def structure(value: Any, _type: Any) -> Any:
        # type() rather than isinstance(): bool is an int, and True is not one cent.
        if type(value) is not kind:
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
        return value

    return structure


def _structure_datetime(value: Any, _type: Any) -> datetime:
    if type(value) is not str:
        raise TypeError(f"expected a date string, got {type(value).__name__}")
    try:
        return datetime.fromisoformat(value)  # the common case, without another call
    except ValueError:
        return parse_datetime(value)


def _structure_open_enum(value: Any, cls: type[_OpenEnum]) -> _OpenEnum:
    if not isinstance(value, str):
        raise TypeError(f"expected a {cls.__name__} string, got {type(value).__name__}")
    member = cls._value2member_map_.get(value)
    return member if member is not None else cls(value)  # type: ignore[return-value]


def _structure_none_as_empty_tuple(type_: Any, conv: Converter) -> Callable[[Any, Any], Any]:
    (item_type, _) = type_.__args__
    item_hook = conv.get_structure_hook(item_type)

    def structure(value: Any, _type: Any) -> tuple[Any, ...]:
        if value is None:  # Violet sends null for "no skus" / "no errors"
            return ()
        if not isinstance(value, list):
            raise TypeError(f"expected a list, got {type(value).__name__}")
        try:
            return tuple([item_hook(item, item_type) for item in value])
        except Exception as first:
            errors: list[Exception] = []
            for index, item in enumerate(value):
                try:
                    item_hook(item, item_type)
                except Exception as exc:  # noqa: BLE001 - collected for the path report
                    note = IterableValidationNote(f"Structuring @ index {index}", index, item_type)
                    # __notes__ by hand, as cattrs does: add_note() is 3.11+.
                    exc.__notes__ = [*getattr(exc, "__notes__", []), note]  # type: ignore[attr-defined]
                    errors.append(exc)
            raise IterableValidationError(f"While structuring {type_!r}", errors, type_) from first

    return structure


def _is_optional(type_: Any) -> bool:
    args = typing.get_args(type_)
    return (
        typing.get_origin(type_) in (typing.Union, types.UnionType)
        and len(args) == 2
        and type(None) in args
    )


def _structure_optional(type_: Any, conv: Converter) -> Callable[[Any, Any], Any]:
    # cattrs' generic Optional handling dispatches on every call; resolving the inner
    # hook once here halves the cost of structuring an OrderRefund.
    (inner,) = (arg for arg in typing.get_args(type_) if arg is not type(None))
    inner_hook = conv.get_structure_hook(inner)

    def structure(value: Any, _type: Any) -> Any:
        return None if value is None else inner_hook(value, inner)

    return structure


def _is_tuple_of(type_: Any) -> bool:
    args: tuple[Any, ...] = getattr(type_, "__args__", ())
    return getattr(type_, "__origin__", None) is tuple and len(args) == 2 and args[1] is Ellipsis


def _field_lines(var: str, n: int, hint: Any, conv: Converter, ns: dict[str, Any]) -> list[str]:
    """Generated lines that turn the raw value in ``var`` into field ``n``'s value, or
    raise (any exception sends the whole body to cattrs' detailed route)."""
    optional = _is_optional(hint)
    inner = next(a for a in typing.get_args(hint) if a is not NoneType) if optional else hint
    if inner in (int, str, bool):
        ns[f"T{n}"] = inner
        allow_none = f" and {var} is not None" if optional else ""
        return [f"if type({var}) is not T{n}{allow_none}:", "    raise TypeError"]
    ns[f"h{n}"], ns[f"t{n}"] = conv.get_structure_hook(inner), inner
    if isinstance(inner, type) and issubclass(inner, _OpenEnum):
        # A known value is one dict lookup; the hook keeps unknown ones and refuses
        # non-strings (an unhashable value raises here, which is just as good).
        ns[f"m{n}"] = inner._value2member_map_
        convert = f"{var} = m{n}.get({var}) or h{n}({var}, t{n})"
    elif inner is datetime:
        # fromisoformat reads Violet's shapes on 3.11+; anything else goes to the hook,
        # which also knows 3.10's limits and refuses non-strings.
        ns["fromiso"] = datetime.fromisoformat
        return [
            f"if {var} is not None:",
            "    try:",
            f"        {var} = fromiso({var})",
            "    except Exception:",
            f"        {var} = h{n}({var}, t{n})",
        ]
    elif _is_tuple_of(inner):
        # Violet's usual "none": an empty list (or null), without a call; a list of
        # records through the item's hook in place (anything else: the tuple's hook).
        item = inner.__args__[0]
        ns[f"i{n}"], ns[f"u{n}"] = conv.get_structure_hook(item), item
        return [
            f"if {var} is None or {var} == []:",
            f"    {var} = ()",
            f"elif type({var}) is list:",
            f"    {var} = tuple([i{n}(e, u{n}) for e in {var}])",
            "else:",
            f"    {var} = h{n}({var}, t{n})",
        ]
    else:
        convert = f"{var} = h{n}({var}, t{n})"
    return [f"if {var} is not None:", f"    {convert}"] if optional else [convert]


def _fast_structure_fn(cls: type[Any], conv: Converter) -> Callable[[Any, Any], Any]:
    """A structure function for a response class that checks fields inline.

    cattrs' generated function calls one hook per field, which made an OrderRefund cost
    about 12 µs. This one tests ``type(v) is int`` in place, looks known enum values up
    directly, parses dates in place and calls hooks only for nested classes. On *any*
    failure it hands the body to cattrs' detailed-validation function, so error paths
    and messages are exactly cattrs'.
    """
    overrides: dict[str, Any] = (
        {"reconciled": override(omit=True), "request_id": override(omit=True)}
        if cls is OrderRefund
        else {}
    )
    slow = make_dict_structure_fn(cls, conv, _cattrs_detailed_validation=True, **overrides)
    hints = typing.get_type_hints(cls)
    fields = attrs.fields(cls)
    ns: dict[str, Any] = {
        "slow": slow,
        "cls": cls,
        "new": object.__new__,
        "not_object": f"expected a JSON object for {cls.__name__}",
    }
    lines = [
        "def structure(o, _t):",
        "    if type(o) is not dict:",
        # Not an object: never a record. (cattrs' own function would read a list or
        # None as an object with no keys, which now that every field is optional would
        # make an empty record out of it.)
        "        raise TypeError(f'{not_object}, got {type(o).__name__}')",
        "    get = o.get",
        "    try:",
    ]
    for n, field in enumerate(fields):
        var = f"x{n}"
        if field.name in overrides:
            ns[f"d{n}"] = field.default  # never read from the body
            lines.append(f"        {var} = d{n}")
            continue
        body = _field_lines(var, n, hints[field.name], conv, ns)
        key = repr(field.name)
        if field.default is attrs.NOTHING:
            lines += [f"        {var} = o[{key}]"] + [f"        {line}" for line in body]
        elif field.default is None or (field.default == () and _is_tuple_of(hints[field.name])):
            # A missing key reads as null, which these fields take as their default.
            lines += [f"        {var} = get({key})"] + [f"        {line}" for line in body]
        else:
            # A missing key takes the field's default (a factory is called each time).
            factory = isinstance(field.default, attrs.Factory)  # type: ignore[arg-type]
            ns[f"d{n}"] = field.default.factory if factory else field.default
            lines += [f"        if {key} in o:", f"            {var} = o[{key}]"]
            lines += [f"            {line}" for line in body]
            lines += ["        else:", f"            {var} = d{n}{'()' if factory else ''}"]
    plain = _plain_slots(cls)
    if not plain:
        # The model's own __init__ runs its converters and validators; whatever it
        # refuses goes to cattrs' detailed route like any other failure.
        call = ", ".join(f"{f.name}=x{n}" if f.kw_only else f"x{n}" for n, f in enumerate(fields))
        lines.append(f"        return cls({call})")
    lines += ["    except Exception:", "        return slow(o, _t)"]
    if plain:
        # A frozen attrs __init__ sets each field through object.__setattr__ (about
        # 2 µs for OrderRefund's 25); with no converters, validators or post-init to
        # run, setting the slots directly builds the same instance.
        lines.append("    inst = new(cls)")
        for n, field in enumerate(fields):
            ns[f"s{n}"] = cls.__dict__[field.name].__set__
            lines.append(f"    s{n}(inst, x{n})")
        lines.append("    return inst")
    exec(compile("\n".join(lines), f"<violet_async structure {cls.__name__}>", "exec"), ns)  # noqa: S102 - generated from our own attrs fields, as cattrs does
    fast: Callable[[Any, Any], Any] = ns["structure"]
    return fast


def _plain_slots(cls: type[Any]) -> bool:
    """True when building ``cls`` is nothing but setting its slots."""
    return (
        "__slots__" in cls.__dict__
        and not hasattr(cls, "__attrs_post_init__")
        and not hasattr(cls, "__attrs_pre_init__")
        and all(f.validator is None and f.converter is None for f in attrs.fields(cls))
        and all(f.name in cls.__dict__ for f in attrs.fields(cls))
    )


def _unstructure_omitting_none(cls: type[Any], conv: Converter) -> Callable[[Any], Any]:
    """Request -> dict, leaving out None fields. Scalars are copied as they are (the
    request validated them); only nested models and enums go through a hook. Generated
    per class, one statement per field, as cattrs does."""
    plain = (int, str, bool)
    hints = typing.get_type_hints(cls)
    ns: dict[str, Any] = {}
    lines = ["def unstructure(i):", "    out = {}"]
    for n, field in enumerate(attrs.fields(cls)):
        hint = hints[field.name]
        kinds = typing.get_args(hint) if _is_optional(hint) else (hint,)
        value = "v"
        if not all(k in plain or k is NoneType for k in kinds):
            ns[f"h{n}"] = conv.get_unstructure_hook(hint)
            value = f"h{n}(v)"
        key = repr(field.name)
        lines += [
            f"    v = i.{field.name}",
            "    if v is not None:",
            f"        out[{key}] = {value}",
        ]
    lines.append("    return out")
    exec(compile("\n".join(lines), f"<violet_async unstructure {cls.__name__}>", "exec"), ns)  # noqa: S102 - generated from our own attrs fields, as cattrs does
    unstructure: Callable[[Any], Any] = ns["unstructure"]
    return unstructure


def configure_converter(conv: Converter) -> None:
    """Register every hook the SDK needs on ``conv``."""
    for kind in (int, str, bool):
        conv.register_structure_hook(kind, _strict(kind))
    conv.register_structure_hook(datetime, _structure_datetime)
    # Per class, not by predicate: the strict `str` hook above would otherwise win,
    # since these enums subclass str.
    for enum_cls in (BagStatus, CancelStatus, ReasonCode, RefundStatus):
        conv.register_structure_hook(enum_cls, _structure_open_enum)
    conv.register_structure_hook_factory(_is_optional, _structure_optional)
    conv.register_structure_hook_factory(_is_tuple_of, _structure_none_as_empty_tuple)
    # `reconciled` is the SDK's own verdict, omitted from structuring: a body must never
    # be able to set it.
    conv.register_structure_hook_factory(lambda t: t in _RESPONSE_TYPES, _fast_structure_fn)
    for cls in _REQUEST_TYPES:
        conv.register_unstructure_hook(cls, _unstructure_omitting_none(cls, conv))
    conv.register_unstructure_hook(tuple, lambda t: [conv.unstructure(i) for i in t])


def make_converter() -> Converter:
    conv = Converter(detailed_validation=True, forbid_extra_keys=False)
    configure_converter(conv)
    return conv


converter = make_converter()
#: OrderRefund's generated hook (a refund answer's hot path; it falls back to cattrs'
#: detailed route by itself, which raises its ClassValidationError).
structure_order_refund = _structure_order_refund = converter.get_structure_hook(OrderRefund)
# The converter's own hooks, looked up once rather than dispatched on every request.
_encoders = {cls: converter.get_unstructure_hook(cls) for cls in _REQUEST_TYPES}


def encode_request(request: Any) -> bytes:
    """Serialize a request model to JSON bytes; unset fields are left out."""
    return orjson.dumps(_encoders[type(request)](request))


def _first_error_path(exc: BaseException) -> tuple[str, str]:
    messages = transform_error(exc, path="$")
    first = messages[0] if messages else str(exc)
    path, _, _rest = first.partition(" @ ")
    if " @ " in first:
        location = first.rsplit(" @ ", 1)[1]
        return location, first
    return path, first


def structure(data: Any, cls: type[T], *, body: bytes, status: int, method: str, path: str) -> T:
    """Structure decoded JSON into ``cls``; any failure is a ResponseFormatError naming
    the field and carrying the raw body."""
    if cls is OrderRefund and type(data) is dict:
        # The hot path: the generated hook falls back to cattrs' detailed one itself.
        try:
            return _structure_order_refund(data, cls)  # type: ignore[no-any-return]
        except (ClassValidationError, IterableValidationError):
            pass  # reported below, with the path, by the general route
    if attrs.has(cls) and not isinstance(data, dict):
        raise ResponseFormatError(
            f"{method} {path}: expected a JSON object for {cls.__name__}, "
            f"got {type(data).__name__}",
            body=body,
            status=status,
            field="$",
            method=method,
            path=path,
        )
    try:
        return converter.structure(data, cls)
    except (ClassValidationError, IterableValidationError) as exc:
        field, detail = _first_error_path(exc)
        raise ResponseFormatError(
            f"{method} {path}: response does not match {cls.__name__}: {detail}",
            body=body,
            status=status,
            field=field,
            method=method,
            path=path,
        ) from exc
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ResponseFormatError(
            f"{method} {path}: response does not match {cls.__name__}: {exc}",
            body=body,
            status=status,
            method=method,
            path=path,
        ) from exc


def decode(body: bytes, *, status: int, method: str, path: str) -> Any:
    """Parse JSON bytes; invalid JSON is a ResponseFormatError with the raw body."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ResponseFormatError(
            f"{method} {path}: response is not JSON (status {status})",
            body=body,
            status=status,
            method=method,
            path=path,
            preview=True,
        ) from exc


def request_from_dict(cls: type[T], data: Any, *, field: str = "request") -> T:
    """Build a request model from the dict :func:`encode_request` wrote (a stored
    pending refund, a batch row). Strict: an unknown key is an error naming it, never
    ignored, because a misspelt field could change what is refunded."""
    if not isinstance(data, dict):
        raise RequestValidationError(field, "must be a JSON object")
    names = {a.name for a in attrs.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise RequestValidationError(field, f"unknown field(s) {', '.join(unknown)}")
    values = dict(data)
    if cls is RefundBagRequest:
        shipping = values.get("shipping")
        if shipping is not None:
            values["shipping"] = request_from_dict(
                ShippingRefund, shipping, field=f"{field}.shipping"
            )
        skus = values.get("skus")
        if isinstance(skus, list):
            values["skus"] = [
                request_from_dict(SkuRefund, sku, field=f"{field}.skus[{index}]")
                for index, sku in enumerate(skus)
            ]
    try:
        return cls(**values)
    except RequestValidationError as exc:
        raise RequestValidationError(f"{field}.{exc.field}", exc.problem) from None
    except TypeError as exc:  # a required field missing
        raise RequestValidationError(field, str(exc)) from None

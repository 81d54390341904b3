"""The schema of the ``PREQUAL_*`` environment and of the TOML file, as pydantic models.

pydantic checks types and shapes (pydantic-settings maps the ``PREQUAL_*`` names to fields); the
dataclasses of ``config`` keep their own range checks and stay the Python API: these models only carry
what the environment or the file says to ``envconfig`` and ``cli``, which build the dataclasses from it.
Startup time only: nothing on the request path imports this module.

Conversions are pydantic's lax ones, with two exceptions made on purpose: a boolean is refused where a
number is expected (``"connect_s": true`` is a mistake, not 1 second), and the file's ``[server]``
numbers must be TOML integers. So ``"strip_prefix": "false"`` is False and ``"connect_s": "0.5"`` is
0.5, while ``"strip_prefix": "yes please"`` is an error naming the key. ``config_error`` turns the first
error of a ``ValidationError`` into one ``ConfigurationError`` line naming the variable or key.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable, Collection, Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from prequal_middleware.config import (
    HealthSettings,
    PolicySpec,
    ProbeSettings,
    RequestLimits,
    RetrySettings,
    Timeouts,
    UpstreamPool,
    UpstreamTLS,
)
from prequal_middleware.core import OutlierSettings, PrequalSettings
from prequal_middleware.core.policies import POLICY_CLASSES
from prequal_middleware.exceptions import ConfigurationError

DEFAULT_POOLS = '{"/api": []}'
DEFAULT_ADMIN_PATH = "/_prequal"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


class _Refused(ConfigurationError):
    """A validation error whose message reads after the field's name ("must be ...", "has ...")."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key  # the error is about this key inside the field


def refuse(message: str, key: str | None = None) -> _Refused:
    """Raised in a validator, pydantic reports it as a ``value_error`` carrying it (``config_error`` reads it)."""
    return _Refused(message, key)


def shown(value: object) -> str:
    """``repr`` of a value for an error line, cut short: the line stays one readable line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --- ValidationError -> one line ------------------------------------------------------------------

_EXPECTED = {
    "bool_parsing": "a boolean (true/false, 1/0, yes/no, on/off)",
    "bool_type": "a boolean (true/false, 1/0, yes/no, on/off)",
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "finite_number": "a finite number",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "set_type": "a list",
    "frozen_set_type": "a list",
}
_OBJECT_TYPES = frozenset({"dict_type", "model_type", "model_attributes_type", "dataclass_type"})
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def config_error(
    exc: ValidationError, where: Callable[[tuple[int | str, ...]], str], *, an_object: str = "an object"
) -> ConfigurationError:
    """The first error of ``exc`` as one line: ``where(loc)`` names the place, then what is wrong."""
    error = exc.errors(include_url=False)[0]
    ctx: dict[str, Any] = dict(error.get("ctx") or {})
    loc = tuple(error["loc"])
    kind = error["type"]
    got = f", got {shown(error['input'])}"
    refused = ctx.get("error")
    if kind == "value_error" and isinstance(refused, _Refused):
        gap = "" if str(refused).startswith(":") else " "
        return ConfigurationError(f"{where(loc if refused.key is None else (*loc, refused.key))}{gap}{refused}")
    place = where(loc)
    if kind == "value_error":  # a dataclass's own check (ConfigurationError) or ours: its text says it all
        return ConfigurationError(f"{place}: {ctx['error']}")
    if kind == "missing":
        return ConfigurationError(f"{place} is required")
    if kind == "literal_error":
        return ConfigurationError(f"{place} must be {ctx['expected']}{got}")
    if kind in _BOUNDS:
        limit = next(iter(ctx.values()))
        return ConfigurationError(f"{place} must be {_BOUNDS[kind]} {limit}{got}")
    if kind in _OBJECT_TYPES:
        return ConfigurationError(f"{place} must be {an_object}{got}")
    if kind in _EXPECTED:
        return ConfigurationError(f"{place} must be {_EXPECTED[kind]}{got}")
    if kind == "json_invalid":
        return ConfigurationError(f"{place} is not valid JSON ({ctx.get('error', 'unreadable')})")
    return ConfigurationError(f"{place}: {error['msg']}")


def pools_where(loc: tuple[int | str, ...]) -> str:
    """``PREQUAL_POOLS['/api'].timeouts.connect_s`` for the loc ``('/api', 'timeouts', 'connect_s')``."""
    text = "PREQUAL_POOLS"
    for i, part in enumerate(loc):
        text += f"[{part!r}]" if i == 0 else f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


# --- imports by name -----------------------------------------------------------------------------


def import_object(spec: str) -> Any:
    """Import ``module:attribute``; a ``ConfigurationError`` says what failed (the caller names the variable)."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigurationError(f"must be 'module:attribute', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import module {module_name!r} ({exc})") from None
    value: Any = module
    try:
        for part in attribute.split("."):
            value = getattr(value, part)
    except AttributeError:
        raise ConfigurationError(f"module {module_name!r} has no attribute {attribute!r}") from None
    return value


def _policy(value: object) -> PolicySpec | None:
    """A built-in policy name stays a name; ``module:Class`` becomes the class."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise refuse(f"must be a string, got {shown(value)}")
    if value in POLICY_CLASSES:
        return value
    if ":" not in value:
        raise refuse(f"must be one of {', '.join(sorted(POLICY_CLASSES))} or 'module:Class', got {value!r}")
    policy = import_object(value)
    if not callable(policy):
        raise ConfigurationError(f"{value!r} is not a class or factory")
    return policy  # type: ignore[no-any-return]


def _hook(value: object) -> Callable[..., Any] | None:
    """``module:function`` becomes the function; empty is no hook."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise refuse(f"must be 'module:function', got {shown(value)}")
    hook = import_object(value.strip())
    if not callable(hook):
        raise ConfigurationError(f"{value!r} is not callable")
    return hook  # type: ignore[no-any-return]


Policy = Annotated[PolicySpec | None, PlainValidator(_policy)]
Hook = Annotated[Callable[..., Any] | None, PlainValidator(_hook)]


# --- PREQUAL_POOLS ---------------------------------------------------------------------------------


def _settings_of(cls: type[Any]) -> BeforeValidator:
    """Check an object of ``cls`` settings before pydantic builds ``cls`` from it: no unknown key, and no
    boolean where the setting is not one (lax mode would read ``true`` as 1)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}

    def check(value: object) -> object:
        if isinstance(value, cls) or not isinstance(value, dict):
            return value  # pydantic's own error: "must be an object"
        for key, item in value.items():
            if key not in fields:
                raise refuse(f"has an unknown setting {key!r}; known: {', '.join(sorted(fields))}")
            if isinstance(item, bool) and not isinstance(fields[key].default, bool):
                raise refuse(f"must be a number, not a boolean, got {item!r}", key=str(key))
            if isinstance(item, list) and any(isinstance(x, bool) for x in item):  # lax mode: true is 1
                raise refuse(f"must be a list without booleans, got {shown(item)}", key=str(key))
        return value

    return BeforeValidator(check)


def _no_bool(kind: str) -> BeforeValidator:
    def check(value: object) -> object:
        if isinstance(value, bool):
            raise refuse(f"must be {kind}, not a boolean, got {value!r}")
        return value

    return BeforeValidator(check)


Number = Annotated[float, _no_bool("a number")]
Count = Annotated[int, _no_bool("an integer")]


def _refuse_unknown(value: object, known: Collection[str], noun: str, *, ordered: bool = True) -> None:
    """Refuse the first key of an object ``value`` that is not in ``known``, listing the known ones
    (sorted, or as ``known`` gives them)."""
    if isinstance(value, dict):
        for key in value:
            if key not in known:
                listed = sorted(known) if ordered else list(known)
                raise refuse(f"has an unknown {noun} {key!r}; known: {', '.join(listed)}")


class _Spec(BaseModel):
    """An object of settings: an unknown key is an error that lists the known ones."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, value: Any) -> Any:
        _refuse_unknown(value, cls.model_fields, "setting")
        return value

    def given(self, *leave_out: str) -> dict[str, Any]:
        """The settings the object names (a setting left out keeps the dataclass's default)."""
        return {name: getattr(self, name) for name in self.model_fields_set if name not in leave_out}


class RouteSpec(_Spec):
    """A route of a pool: a prefix, or an object of ``Route`` settings."""

    prefix: str
    strip_prefix: bool | None = None
    preserve_host: bool | None = None
    websockets: bool | None = None
    timeouts: Annotated[Timeouts, _settings_of(Timeouts)] | None = None
    limits: Annotated[RequestLimits, _settings_of(RequestLimits)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _prefix_alone(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"prefix": value}
        if not isinstance(value, dict):
            raise refuse(f"must be a prefix or an object, got {shown(value)}")
        if "prefix" not in value and set(value) <= set(cls.model_fields):
            raise refuse("needs a prefix")
        return value


# "UpstreamTLS.ca_file must name an existing file, ..." or "UpstreamTLS.ca_file: cannot load ...".
_TLS_ERROR = re.compile(r"UpstreamTLS\.(\w+)(.*)", re.DOTALL)


class TLSSpec(_Spec):
    """A pool's ``tls`` object: the ``UpstreamTLS`` settings (paths relative to the working directory)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None
    verify: bool = True
    min_version: str | None = None  # UpstreamTLS says which
    _built: UpstreamTLS = PrivateAttr()

    @model_validator(mode="after")
    def _loads(self) -> TLSSpec:
        # Built (and its files read) here, so --check fails on a missing file or a bad PEM, naming the key.
        try:
            self._built = UpstreamTLS(**self.given())
        except ConfigurationError as exc:
            found = _TLS_ERROR.fullmatch(str(exc))
            if found is None or found.group(1) not in type(self).model_fields:
                raise
            raise refuse(found.group(2).lstrip(" "), key=found.group(1)) from None
        return self

    def settings(self) -> UpstreamTLS:
        """The ``UpstreamTLS`` it describes."""
        return self._built


def _pool_default(name: str) -> Any:
    spec = UpstreamPool.__dataclass_fields__[name]
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return spec.default


class PoolSpec(_Spec):
    """One entry of ``PREQUAL_POOLS``: the ``UpstreamPool`` settings, and ``routes``."""

    upstreams: list[str] = Field(default_factory=list)
    routes: list[RouteSpec] = Field(default_factory=list)
    policy: Policy = None
    strip_prefix: bool = _pool_default("strip_prefix")
    preserve_host: bool = _pool_default("preserve_host")
    websockets: bool = _pool_default("websockets")
    required_for_ready: bool | None = _pool_default("required_for_ready")
    max_in_flight: Count | None = _pool_default("max_in_flight")
    max_in_flight_per_backend: Count | None = _pool_default("max_in_flight_per_backend")
    clients_per_pool: Count = _pool_default("clients_per_pool")
    max_websockets: Count = _pool_default("max_websockets")
    retry_after_s: Count = _pool_default("retry_after_s")
    slow_start_s: Number = _pool_default("slow_start_s")
    timeouts: Annotated[Timeouts, _settings_of(Timeouts)] = _pool_default("timeouts")
    prequal: Annotated[PrequalSettings, _settings_of(PrequalSettings)] = _pool_default("prequal")
    outliers: Annotated[OutlierSettings, _settings_of(OutlierSettings)] = _pool_default("outliers")
    probes: Annotated[ProbeSettings, _settings_of(ProbeSettings)] = _pool_default("probes")
    health: Annotated[HealthSettings, _settings_of(HealthSettings)] = _pool_default("health")
    retry: Annotated[RetrySettings, _settings_of(RetrySettings)] = _pool_default("retry")
    limits: Annotated[RequestLimits, _settings_of(RequestLimits)] = _pool_default("limits")
    tls: TLSSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _list_alone(cls, value: Any) -> Any:
        if isinstance(value, list):
            return {"upstreams": value}
        if not isinstance(value, dict):
            raise refuse(f"must be a list of URLs or an object, got {shown(value)}")
        return value


POOLS_SCHEMA = dict[str, PoolSpec]


# --- the PREQUAL_* variables -----------------------------------------------------------------------


def _blank_is_unset(value: object) -> object:
    """Surrounding spaces are not part of a value, and an empty variable is an unset one."""
    if isinstance(value, str):
        value = value.strip()
        return value or None
    return value


def _commas(value: object) -> object:
    """A list variable: comma-separated items, spaces around them dropped (empty: unset)."""
    if isinstance(value, str):
        items = tuple(item.strip() for item in value.split(",") if item.strip())
        return items or None
    return value


def _admin_path(value: str) -> str:
    if not (value.startswith("/") and not value.endswith("/") and len(value) > 1):
        raise refuse(f"must be a path like /_prequal, got {value!r}")
    return value


def _registry_spec(value: str | None) -> str | None:
    """The forms ``PREQUAL_REGISTRY`` takes; ``envconfig.registry_from_env`` builds the registry."""
    if value is None or value == "memory" or value.startswith(("redis://", "rediss://", "unix://")):
        return value
    if value.startswith("sqlite:"):
        if not value.removeprefix("sqlite:"):
            raise ConfigurationError("sqlite: needs a file path, e.g. sqlite:/var/lib/prequal/registry.db")
        return value
    if ":" in value and "://" not in value:
        return value  # module:Class, imported when the registry is built
    raise refuse(f"must be 'memory', 'sqlite:PATH', a redis:// URL or 'module:Class', got {value!r}")


OFF = "off"
# An HTTP field name (RFC 9110 token).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_OFF_WORDS = frozenset({"", "off", "false", "no", "0", "none"})
_ON_WORDS = frozenset({"on", "true", "yes", "1"})


def _header_or_off(value: object) -> object:
    """``PREQUAL_REQUEST_ID_HEADER``: a header name; empty or ``off`` (``false``, ``no``, ...): no request ids
    (an empty variable is not "unset" here, as with ``PREQUAL_HEALTH_PATH``); ``on``: the default header."""
    if not isinstance(value, str):
        return value
    word = value.strip().lower()
    if word in _OFF_WORDS:
        return OFF
    if word in _ON_WORDS:
        return None
    if not _TOKEN.fullmatch(word):
        raise refuse(f"must be a header name, or off, got {value!r}")
    return word


def _lower(value: object) -> object:
    value = _blank_is_unset(value)
    return value.lower() if isinstance(value, str) else value


Text = Annotated[str | None, BeforeValidator(_blank_is_unset)]
Flag = Annotated[bool | None, BeforeValidator(_blank_is_unset)]
Seconds = Annotated[float | None, BeforeValidator(_blank_is_unset)]
Interval = Annotated[Annotated[float, Field(ge=0, allow_inf_nan=False)] | None, BeforeValidator(_blank_is_unset)]
Integer = Annotated[int | None, BeforeValidator(_blank_is_unset)]
Commas = Annotated[tuple[str, ...] | None, BeforeValidator(_commas)]
AdminPath = Annotated[str, AfterValidator(_admin_path)]


class _EnvironSource(EnvSettingsSource):
    """The ``PREQUAL_*`` variables of a given mapping (the process environment or one built by the CLI)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ  # read by _load_env_vars, which the base __init__ calls
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name if self.case_sensitive else name.lower(): value for name, value in self._environ.items()}

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        return value  # lists are comma-separated (the variables' own format), not JSON


class EnvSettings(BaseSettings):
    """The ``PREQUAL_*`` variables (names: ``PREQUAL_`` + the field in upper case). Build with ``read``."""

    # Not case-sensitive: pydantic-settings then matches PREQUAL_POOLS to the field pools (it lowers both).
    model_config = SettingsConfigDict(env_prefix="PREQUAL_", case_sensitive=False, extra="ignore", frozen=True)

    pools: str = DEFAULT_POOLS  # JSON, validated by POOLS_SCHEMA so its errors name the pool
    policy: Annotated[Policy, BeforeValidator(_blank_is_unset)] = None
    health_path: str | None = None  # empty turns active checks off: not "unset"
    probe_path: str | None = None
    registry: Annotated[Text, AfterValidator(_registry_spec)] = None
    registry_path: Text = None  # read by registry.default
    registration_token: Annotated[str | None, BeforeValidator(lambda v: v or None)] = None
    admin_trust_loopback: Flag = None
    admin_allowed_hosts: Commas = None
    allowed_upstreams: Commas = None
    ready_while_stale_s: Seconds = None
    lease_ttl_s: Seconds = None
    via_pseudonym: Text = None
    transport: Annotated[Literal["h1", "aiohttp"] | None, BeforeValidator(_blank_is_unset)] = None
    dns: Flag = None
    dns_nameservers: Commas = None
    dns_refresh_s: Seconds = None
    register_hook: Hook = None
    unregister_hook: Hook = None
    path_rewrite_hook: Hook = None
    request_hook: Hook = None
    response_hook: Hook = None
    admin_path: AdminPath = DEFAULT_ADMIN_PATH
    access_log: Annotated[Literal["off", "json", "plain"] | None, BeforeValidator(_lower)] = None
    # None: unset (the default header); OFF: no request ids; else the header, lower case.
    request_id_header: Annotated[str | None, BeforeValidator(_header_or_off)] = None
    tracing: Flag = None
    history_window_s: Seconds = None
    history_step_s: Seconds = None
    history_max_backends: Integer = None
    config_poll_s: Interval = None  # read by reload.poll_interval; 0: no file watch

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only what ``read`` passes: the caller chooses the environment (tests and the CLI pass their own).
        return (init_settings,)

    @classmethod
    def read(cls, environ: Mapping[str, str]) -> EnvSettings:
        """The variables of ``environ``, validated; a ``ConfigurationError`` names the first bad one."""
        try:
            return cls(**_EnvironSource(cls, environ)())
        except ValidationError as exc:
            raise config_error(exc, lambda loc: "PREQUAL_" + str(loc[0]).upper() if loc else "PREQUAL_*") from None


def variable(field: str) -> str:
    """The variable of an ``EnvSettings`` field."""
    return "PREQUAL_" + field.upper()


# --- the TOML file ---------------------------------------------------------------------------------


def _variable_text(value: object) -> str:
    """A ``[gateway]`` value as its variable's text: lists joined with commas, booleans true/false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    raise refuse(f"must be a string, number, boolean or list of strings, got {shown(value)}")


# [gateway] keys: the PREQUAL_* variables, lower case without the prefix (the pools are [pools], the
# admin path is [server]'s).
GATEWAY_KEYS = frozenset(EnvSettings.model_fields) - {"pools", "admin_path"}


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, value: Any) -> Any:
        _refuse_unknown(value, cls.model_fields, "key", ordered=False)  # listed as the table declares them
        return value


class ServerTable(_Table):
    """``[server]``: how ``prequal-gateway`` serves (flags override it)."""

    host: StrictStr | None = None
    port: Annotated[StrictInt, Field(ge=0, le=65535)] | None = None
    workers: Annotated[StrictInt, Field(ge=1)] | None = None
    log_level: Literal["critical", "error", "warning", "info", "debug"] | None = None
    admin_path: AdminPath | None = None


class ConfigFile(BaseModel):
    """The whole file: ``[server]``, ``[gateway]`` (``PREQUAL_*`` values) and ``[pools]`` (``PREQUAL_POOLS``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    server: ServerTable = Field(default_factory=ServerTable)
    gateway: dict[str, Annotated[str, PlainValidator(_variable_text)]] = Field(default_factory=dict)
    pools: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _known_tables(cls, value: Any) -> Any:
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(cls.model_fields))
            if unknown:
                raise refuse(f"unknown table {unknown[0]!r}; known: {', '.join(sorted(cls.model_fields))}")
        return value

    @field_validator("gateway", mode="before")
    @classmethod
    def _known_variables(cls, value: Any) -> Any:
        _refuse_unknown(value, GATEWAY_KEYS, "key")
        return value


def file_where(path: str) -> Callable[[tuple[int | str, ...]], str]:
    """``prequal.toml: [server].port`` for the loc ``('server', 'port')``."""

    def where(loc: tuple[int | str, ...]) -> str:
        if not loc:
            return f"{path}:"
        rest = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
        return f"{path}: [{loc[0]}]{rest}"

    return where

"""What each `solaris` process reads, composed from the settings groups, and the one place
they are filled: defaults, then a TOML file (`--config` or `SOLARIS_CONFIG`), then `SOLARIS_*`
environment variables, then flags (later wins).

`ServeSettings` is the one object `solaris serve` reads, `DaemonSettings` the one
`solaris precompute` reads, `LogSettings` what every command reads before it starts. Every
field is a flag `--name-with-dashes`, a variable `SOLARIS_NAME` and a TOML key (`name-with-dashes`
or `name_with_dashes`). pydantic-settings reads the three sources; `load` layers them and turns
a refusal into one line that names the setting, where its value came from, and what it takes.

`python -m solaris.app.settings` prints README's settings tables; with a path, it rewrites them
there.
"""

import argparse
import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import annotated_types
from pydantic import BaseModel, BeforeValidator, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    CliSettingsSource,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from solaris.precompute.settings import PrecomputeSettings
from solaris.server.settings import (
    Accepts,
    SettingsError,
    SidecarSettings,
    StoreSettings,
)

ENV_PREFIX = "SOLARIS_"
LogLevel = Annotated[
    Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
    BeforeValidator(lambda value: value.upper() if isinstance(value, str) else value),
]


class ProcessSettings(BaseSettings):
    """The base of what one command reads: named `SOLARIS_*` in the environment, frozen, no
    unknown names. Built directly, it takes only its arguments; `load` layers the sources."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="forbid", hide_input_in_errors=True
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # `load` reads the file, the environment and the flags itself: it needs the file's
        # path, an environment to read (tests pass one), and each value's origin for errors.
        return (init_settings,)


class LogSettings(ProcessSettings):
    """How every command logs; flags before the command: `solaris --log-format json serve`."""

    log_level: LogLevel = Field(
        "INFO",
        description="DEBUG, INFO, WARNING, ERROR or CRITICAL, in any case; the model "
        "exporter's libraries log each pass at DEBUG only.",
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="text for people, or json: one JSON object per line, for collectors."
    )


class ServeSettings(SidecarSettings, PrecomputeSettings, ProcessSettings):
    """Everything `solaris serve` reads: the sidecar's settings and (embedded) the daemon's."""

    precompute: bool = Field(
        True, description="Run the precompute daemon in this process (false: serve only)."
    )


class DaemonSettings(StoreSettings, PrecomputeSettings, ProcessSettings):
    """Everything `solaris precompute` reads: the shared store's settings and the daemon's."""

    @model_validator(mode="after")
    def _needs_redis(self) -> "DaemonSettings":
        if not self.redis:
            raise SettingsError(
                "must be set: solaris precompute works on the shared store and work queue",
                "redis",
            )
        return self


Settings = TypeVar("Settings", bound=ProcessSettings)
COMMANDS: dict[str, type[ProcessSettings]] = {"serve": ServeSettings, "precompute": DaemonSettings}
EVERY_SETTING = {
    *ServeSettings.model_fields,
    *DaemonSettings.model_fields,
    *LogSettings.model_fields,
}
OTHER_VARIABLES = {"SOLARIS_CONFIG", "SOLARIS_REDIS_PASSWORD"}
SERVICE_LINK = re.compile(r"_SERVICE_(HOST|PORT(_\w+)?)$|_PORT_\d+_(TCP|UDP|SCTP)(_\w+)?$")
"""What Kubernetes names the variables it gives every pod for a Service such as `solaris-redis`
(`SOLARIS_REDIS_SERVICE_HOST`...): not settings, and not ours to refuse. Our manifests turn
them off (`enableServiceLinks: false`): a Service named `solaris` would set `SOLARIS_PORT`."""


def add_flags(parser: argparse.ArgumentParser, settings_type: type[ProcessSettings]) -> None:
    """One flag per setting on `parser`, its help giving the default and the variable."""

    def add_argument(target: Any, *names: str, **options: Any) -> Any:
        name = options.get("dest", "")
        field = settings_type.model_fields.get(name)
        if field is not None:
            options["metavar"] = metavar(field)
            options["help"] = (
                f"{field.description} (default: {shown_default(field)}) "
                f"[env: {ENV_PREFIX}{name.upper()}]"
            )
        return target.add_argument(*names, **options)

    CliSettingsSource(
        settings_type, root_parser=parser, cli_kebab_case=True, add_argument_method=add_argument
    )


def load(
    settings_type: type[Settings],
    args: argparse.Namespace | None = None,
    environ: Mapping[str, str] | None = None,
    config: str | Path | None = None,
) -> Settings:
    """The settings from their defaults, then `config`, then `environ` (the process's by
    default), then the flags in `args` (parsed by a parser `add_flags` filled).

    Raises:
        SettingsError: one line, naming the setting and what it takes.
    """
    _refuse_unknown_variables(os.environ if environ is None else environ)
    layers = [
        Layer(_flags(settings_type, args), lambda name: "--" + name.replace("_", "-")),
        Layer(_Environment(settings_type, environ)(), lambda name: ENV_PREFIX + name.upper()),
        Layer(config_values(settings_type, config), lambda name: str(config)),
    ]
    values: dict[str, Any] = {}
    for layer in reversed(layers):
        values.update(layer.values)
    try:
        return settings_type(**values)
    except ValidationError as error:
        raise SettingsError(explain(error, settings_type, layers)) from None


def _refuse_unknown_variables(environ: Mapping[str, str]) -> None:
    """A `SOLARIS_*` variable no command reads is a typo that would pass unseen, as a file's
    unknown key would (`config_values`); one another command reads is passed over."""
    known = {ENV_PREFIX + name.upper() for name in EVERY_SETTING} | OTHER_VARIABLES
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known and not SERVICE_LINK.search(name):
            raise SettingsError(
                f"{name} is set, but no solaris command reads it (the variables are listed "
                "by solaris serve --help and solaris precompute --help)"
            )


@dataclass(frozen=True)
class Layer:
    """The values one source gave, and how to say where a setting's value came from."""

    values: Mapping[str, Any]
    origin: Callable[[str], str]


def _flags(settings_type: type[ProcessSettings], args: argparse.Namespace | None) -> dict[str, Any]:
    if args is None:
        return {}
    source: CliSettingsSource[Any] = CliSettingsSource(settings_type, cli_kebab_case=True)
    return source(parsed_args=args)()


class _Environment(EnvSettingsSource):
    """`SOLARIS_*` variables read from a mapping: the process's environment, or a test's."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str] | None) -> None:
        self._environ = os.environ if environ is None else environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        fold: Callable[[str], str] = str if self.case_sensitive else str.lower
        return {fold(name): value for name, value in self._environ.items()}


class _ConfigFile(TomlConfigSettingsSource):
    """A TOML file of settings, its keys read with `-` or `_`."""

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        raw = super()._read_file(file_path)
        return {str(key).replace("-", "_"): value for key, value in raw.items()}


def config_values(
    settings_type: type[ProcessSettings], config: str | Path | None
) -> dict[str, Any]:
    """The file's settings that `settings_type` reads. A key no command reads is refused;
    one that another command reads is passed over, so that one file serves every command."""
    if not config:
        return {}
    path = Path(config).expanduser()
    if not path.is_file():
        raise SettingsError(f"no file at {config}", "config")
    try:
        data = _ConfigFile(settings_type, toml_file=path).toml_data
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise SettingsError(f"{config} is not a TOML file of settings: {error}", "config") from None
    unknown = sorted(set(data) - EVERY_SETTING)
    if unknown:
        raise SettingsError(
            f"{config} names an unknown setting {unknown[0]!r} (the settings are listed by "
            "solaris serve --help)",
            "config",
        )
    return {name: value for name, value in data.items() if name in settings_type.model_fields}


def explain(
    error: ValidationError, settings_type: type[ProcessSettings], layers: list[Layer]
) -> str:
    """The first refusal in `error`, in one line: `name: got VALUE from ORIGIN; must be ...`."""
    detail = error.errors(include_url=False)[0]
    cause = detail.get("ctx", {}).get("error")
    name = str(detail["loc"][0]) if detail["loc"] else ""
    if isinstance(cause, SettingsError) and cause.setting:
        name = cause.setting
    field = settings_type.model_fields.get(name)
    if isinstance(cause, SettingsError):
        problem = cause.problem if cause.setting else str(cause)
    elif field is not None:
        problem = f"must be {accepted(field)}"
    else:
        problem = str(detail["msg"])
    if not name:
        return problem
    got = _origin(name, field, layers)
    return f"{name}: {got}; {problem}" if got else f"{name}: {problem}"


def _origin(name: str, field: FieldInfo | None, layers: list[Layer]) -> str:
    for layer in layers:
        if name in layer.values:
            if field is not None and field.repr is False:
                return f"got a value from {layer.origin(name)} (not shown: it may hold a password)"
            return f"got {_shown(layer.values[name])} from {layer.origin(name)}"
    return ""


def _shown(value: Any) -> str:
    text = str(value)
    return text if text and text.strip() == text else repr(value)


def accepted(field: FieldInfo) -> str:
    """What a field takes, in words: `a port number from 0 to 65535`."""
    accepts = _accepts(field)
    words = accepts.words if accepts else _words(field.annotation)
    text = " ".join(filter(None, (words, _bounds(field.metadata))))
    return f"{text} ({accepts.detail})" if accepts and accepts.detail else text


def metavar(field: FieldInfo) -> str:
    accepts = _accepts(field)
    if accepts:
        return accepts.metavar
    if get_origin(field.annotation) is Literal:
        return "{" + ",".join(str(choice) for choice in get_args(field.annotation)) + "}"
    names: dict[Any, str] = {bool: "BOOL", int: "INT", float: "NUMBER"}
    return names.get(field.annotation, "TEXT")


def _accepts(field: FieldInfo) -> Accepts | None:
    return next((item for item in field.metadata if isinstance(item, Accepts)), None)


def _words(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(str(choice) for choice in get_args(annotation))
    names: dict[Any, str] = {bool: "true or false", int: "a whole number", float: "a number"}
    return names.get(annotation, "text")


_BOUNDS = (
    (annotated_types.Ge, "ge", "of at least"),
    (annotated_types.Gt, "gt", "above"),
    (annotated_types.Le, "le", "of at most"),
    (annotated_types.Lt, "lt", "below"),
)


def _bounds(metadata: list[Any]) -> str:
    limits = {
        name: (phrase, getattr(item, name))
        for item in metadata
        for kind, name, phrase in _BOUNDS
        if isinstance(item, kind)
    }
    if "ge" in limits and "le" in limits:
        return f"from {limits['ge'][1]} to {limits['le'][1]}"
    return " and ".join(f"{phrase} {value:g}" for phrase, value in limits.values())


TABLE_GROUPS: tuple[tuple[str, type[BaseModel], tuple[type[BaseModel], ...]], ...] = (
    ("The sidecar (`solaris serve` only)", ServeSettings, (StoreSettings, PrecomputeSettings)),
    ("The store (both commands)", StoreSettings, ()),
    ("The model and the speculator (both commands)", PrecomputeSettings, ()),
    (
        "Logging (every command; flags before it: `solaris --log-level debug serve`)",
        LogSettings,
        (),
    ),
)
TABLE_START = "<!-- settings tables: python -m solaris.app.settings README.md -->"
TABLE_END = "<!-- end of settings tables -->"


def readme_tables() -> str:
    """README's settings tables, one per group, from the fields' definitions."""
    blocks = []
    for title, group, less in TABLE_GROUPS:
        skipped = {name for base in less for name in base.model_fields}
        rows = [
            _row(name, field) for name, field in group.model_fields.items() if name not in skipped
        ]
        header = "| flag | environment | default | meaning |\n| --- | --- | --- | --- |"
        blocks.append(f"**{title}**\n\n{header}\n" + "\n".join(rows))
    return "\n\n".join(blocks)


def shown_default(field: FieldInfo) -> str:
    """The default as it would be written: `true`, `""`, `268435456`."""
    default = field.default
    shown = str(default).lower() if isinstance(default, bool) else str(default)
    return shown or '""'


def _row(name: str, field: FieldInfo) -> str:
    cells = ("--" + name.replace("_", "-"), ENV_PREFIX + name.upper(), shown_default(field))
    return "| " + " | ".join(f"`{cell}`" for cell in cells) + f" | {field.description} |"


def with_tables(readme: str) -> str:
    """`readme` with the text between its table markers replaced by `readme_tables()`."""
    head, start, rest = readme.partition(TABLE_START)
    _, end, tail = rest.partition(TABLE_END)
    if not (start and end):
        raise ValueError(f"README has no {TABLE_START!r} ... {TABLE_END!r} section")
    return f"{head}{start}\n\n{readme_tables()}\n\n{end}{tail}"


if __name__ == "__main__":
    if len(sys.argv) > 1:
        readme_path = Path(sys.argv[1])
        readme_path.write_text(with_tables(readme_path.read_text()))
    else:
        print(readme_tables())

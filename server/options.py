"""Command-line options of ``matlora-server``, built from ServerSettings, and the messages for invalid settings.

Every field of ServerSettings is the option ``--field-name`` and the environment variable ``MATLORA_FIELD_NAME``,
so messages name a setting both ways.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Mapping

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from .config import BUNDLED_ADAPTER, ServerSettings

ENV_PREFIX = "MATLORA_"
# The model loader reads this one besides the settings: the folder for dequantized built-in models.
OTHER_SERVER_VARIABLES = {"MATLORA_CACHE_DIR"}
# Variables of the other matlora programs, with the hint logged when one is set for the server.
CLIENT_VARIABLES = {
    "MATLORA_API_KEY": "the server reads MATLORA_API_KEYS (comma-separated keys), while MATLORA_API_KEY is read "
                       "by matlora-client and matlora-bench; without MATLORA_API_KEYS, --api-keys or "
                       "--api-keys-file the server requires no API key",
    "MATLORA_URL": "it is read by matlora-client and matlora-bench",
}
# Settings whose values never appear in a message.
SECRET_FIELDS = {"api_keys"}


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name_of(name: str) -> str:
    return ENV_PREFIX + name.upper()


def setting_names(name: str) -> str:
    """Return how a setting is given, as in "--port / MATLORA_PORT"."""
    return f"{flag_of(name)} / {env_name_of(name)}"


def literal_values(field: FieldInfo) -> tuple[str, ...]:
    if typing.get_origin(field.annotation) is typing.Literal:
        return typing.get_args(field.annotation)
    return ()


def is_list(field: FieldInfo) -> bool:
    return typing.get_origin(field.annotation) is list


# --- --help ---------------------------------------------------------------------------------------------------


def shown_default(name: str, field: FieldInfo) -> str | None:
    """Return the default as --help shows it, or None where there is none to show.

    A default of None or an empty list is left out, because the description states what happens then.
    """
    if name == "adapter":
        return f"{BUNDLED_ADAPTER.as_posix()} in the source tree"
    default = field.default
    if default is None or default == []:
        return None
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, list):
        return ",".join(str(item) for item in default)
    return str(default)


def help_text(name: str, field: FieldInfo) -> str:
    text = field.description or ""
    if is_list(field):
        text += " (comma-separated, or a JSON list)"
    default = shown_default(name, field)
    if default is not None:
        text += f" (default: {default})"
    return text.replace("%", "%%")    # argparse expands % in help text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matlora-server", description="Serve one Matryoshka LoRA adapter at a "
                                     "rank chosen per request. Every option can also be set as the environment "
                                     "variable MATLORA_<NAME>, as in MATLORA_PORT for --port.")
    for name, field in ServerSettings.model_fields.items():
        options: dict[str, typing.Any] = {"dest": name, "default": None, "help": help_text(name, field)}
        values = literal_values(field)
        if field.annotation is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif values:
            options["metavar"] = "{" + ",".join(values) + "}"
        # Values stay text here: ServerSettings parses them as it parses environment variables.
        parser.add_argument(flag_of(name), **options)
    return parser


# --- invalid settings -------------------------------------------------------------------------------------------


def number_range(field: FieldInfo, noun: str) -> str:
    """Describe the numbers a field allows from its ge/gt/le constraints, as in "an integer from 1 to 65535"."""
    bounds = {}
    for constraint in field.metadata:
        for kind in ("ge", "gt", "le"):
            if hasattr(constraint, kind):
                bounds[kind] = getattr(constraint, kind)
    if "ge" in bounds and "le" in bounds:
        return f"{noun} from {bounds['ge']} to {bounds['le']}"
    if "ge" in bounds:
        return f"{noun} of {bounds['ge']} or more"
    if "gt" in bounds:
        return f"{noun} above {bounds['gt']}"
    return noun


def allowed_values(name: str, field: FieldInfo) -> str | None:
    """Describe the values a setting accepts, or None where any text is accepted."""
    values = literal_values(field)
    if values:
        return ", ".join(values)
    if name == "default_rank":
        return "a rank that the adapter offers"
    annotation = field.annotation
    if annotation is bool:
        return "true or false (also 1 or 0, yes or no, on or off)"
    if annotation in (int, int | None):
        return number_range(field, "an integer")
    if annotation is float:
        return number_range(field, "a number")
    if annotation == list[int]:
        return "integers of 1 or more, comma-separated or as a JSON list"
    if is_list(field):
        return "comma-separated values, or a JSON list of strings"
    return None


def describe_problem(problem: dict) -> str:
    """Return one line for one pydantic error: the setting, what is wrong, the value given and what is allowed."""
    message = problem["msg"].removeprefix("Value error, ")
    location = problem.get("loc", ())
    if not location:
        return message        # a check across settings, whose message names the options
    name = str(location[0])
    field = ServerSettings.model_fields.get(name)
    where = setting_names(name)
    if len(location) > 1 and isinstance(location[1], int):
        where += f", item {location[1] + 1}"
    line = f"{where}: {message}"
    # The messages of value errors come from this project's validators, which name the value and the fix.
    # The messages of literal errors list the allowed values.
    if problem["type"] == "value_error":
        return line
    if "input" in problem and name not in SECRET_FIELDS:
        line += f" (got {problem['input']!r})"
    allowed = allowed_values(name, field) if field is not None else None
    if allowed is not None and problem["type"] != "literal_error":
        line += f"; allowed: {allowed}"
    return line


def settings_error_lines(error: ValidationError) -> list[str]:
    return [describe_problem(problem) for problem in error.errors()]


def unknown_environment_variables(environ: Mapping[str, str]) -> list[str]:
    """Return one warning per MATLORA_* variable that the server does not read. Values are never included."""
    known = {env_name_of(name) for name in ServerSettings.model_fields} | OTHER_SERVER_VARIABLES
    warnings = []
    for variable in sorted(environ):
        # pydantic-settings matches names case-insensitively, so matlora_port is read as MATLORA_PORT.
        upper = variable.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known:
            continue
        hint = CLIENT_VARIABLES.get(upper, "check its name: option --some-name is the variable MATLORA_SOME_NAME "
                                           "(matlora-server --help lists the options)")
        warnings.append(f"environment variable {variable} is set, but matlora-server does not read it: {hint}")
    return warnings

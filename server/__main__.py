"""``matlora-server`` / ``python -m matlora_server``: start the HTTP server."""

from __future__ import annotations

import logging
import math
import os
import signal
import sys

import uvicorn
from pydantic import ValidationError

from matlora_core.adapter import AdapterError, read_config
from matlora_core.base_model import ModelLoadError

from .app import create_app
from .config import ServerSettings
from .options import build_parser, setting_names, settings_error_lines, unknown_environment_variables

logger = logging.getLogger("matlora_server")

# Exit status of invalid settings, as argparse uses for invalid options.
INVALID_SETTINGS = 2


class GracefulServer(uvicorn.Server):
    """A uvicorn server that marks the app as shutting down on SIGTERM/SIGINT before it drains connections."""

    def __init__(self, config: uvicorn.Config, app) -> None:
        super().__init__(config)
        self.matlora_app = app

    def handle_exit(self, sig, frame) -> None:
        if not self.matlora_app.state.shutting_down:
            logger.info("received signal %s: no new requests; finishing running ones for up to %.0f s", sig,
                        self.matlora_app.state.settings.shutdown_grace_s)
            self.matlora_app.state.shutting_down = True
            self.matlora_app.state.engine.stop_accepting()
        # uvicorn.Server.handle_exit also records the signal and raises it again once the server has stopped
        # (uvicorn >= 0.29), which would end a drained shutdown with status 143 instead of 0. This sets the same
        # flags without recording: a second SIGINT still forces the exit.
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {name: value for name, value in vars(args).items() if value is not None}
    try:
        settings = ServerSettings(**overrides)
    except ValidationError as error:
        return report_invalid_settings(settings_error_lines(error))
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for warning in unknown_environment_variables(os.environ):
        logger.warning("%s", warning)

    status = check_before_loading(settings)
    if status is not None:
        return status
    try:
        app = create_app(settings)
    except (AdapterError, ModelLoadError, ValueError, OSError) as error:
        logger.error("cannot start: %s", error)
        return 1
    # Open connections get shutdown_grace_s to finish; a timeout of None would wait for them without limit.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                            timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s), access_log=False)
    GracefulServer(config, app).run()
    return 0


def check_before_loading(settings: ServerSettings) -> int | None:
    """Check the settings that depend on files before the model loads; return an exit status, or None if all pass.

    The keys file and the default rank are settings problems (status 2). An adapter whose config cannot be read
    fails as a load error would (status 1), only sooner.
    """
    try:
        settings.load_api_keys()
    except ValueError as error:
        return report_invalid_settings([f"{setting_names('api_keys_file')}: {error}"])
    try:
        adapter_config = read_config(settings.adapter)
    except AdapterError as error:
        logger.error("cannot start: %s", error)
        return 1
    offered = adapter_config.offered_ranks
    if settings.default_rank is not None and settings.default_rank not in offered:
        return report_invalid_settings([f"{setting_names('default_rank')}: rank {settings.default_rank} is not "
                                        f"offered by the adapter {settings.adapter}; allowed: {offered}"])
    return None


def report_invalid_settings(problems: list[str]) -> int:
    for problem in problems:
        print(f"matlora-server: invalid setting: {problem}", file=sys.stderr)
    return INVALID_SETTINGS


if __name__ == "__main__":
    sys.exit(main())

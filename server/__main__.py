"""``matlora-server`` / ``python -m matlora_server``: start the HTTP server."""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys

import uvicorn

from matlora_core.adapter import AdapterError
from matlora_core.base_model import ModelLoadError

from .app import create_app
from .config import ServerSettings

logger = logging.getLogger("matlora_server")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matlora-server", description="Serve one Matryoshka LoRA adapter at a "
                                     "rank chosen per request. Every option can also be set as MATLORA_<NAME>.")
    for name, field in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        annotation = str(field.annotation)
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=field.description)
        elif annotation.startswith("list"):
            parser.add_argument(flag, dest=name, default=None, help=f"{field.description} (comma-separated)",
                                type=lambda text: [part.strip() for part in text.split(",") if part.strip()])
        else:
            parser.add_argument(flag, dest=name, default=None, help=f"{field.description} (default: {field.default})")
    return parser


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
    except ValueError as error:
        print(f"matlora-server: invalid settings: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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


if __name__ == "__main__":
    sys.exit(main())

"""What one deployment of the server is: the one definition behind `reprotune serve`'s options, the
`args:` of a Serve config file (deploy/serve_config.yaml, deploy/rayservice.yaml) and each replica's
settings. The CLI builds its options from these fields (their types, defaults, bounds and help), so
a new setting is added here once. No Ray here: the CLI imports this before Ray may be imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from reprotune.errors import ReprotuneError
from reprotune.images import MAX_PIXELS

if TYPE_CHECKING:
    from reprotune.inference.protocol import Contract


class Settings(BaseModel):
    """One deployment of the classifier: the model file, the limits, and how many replicas."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field("models/model.onnx", description="The ONNX export to serve (its model_card.json beside it).")
    name: str = Field("reprotune", description="The model's name in the protocol's URLs.")
    replicas: int = Field(1, ge=1, description="Replicas (each its own process and ONNX Runtime session).")
    max_replicas: int = Field(0, ge=0, description="Autoscale between --replicas and this many (0: a fixed number).")
    threads: int = Field(0, ge=0, description="ONNX Runtime threads (and Ray CPUs) per replica; 0: the CPUs of "
                                               "the Ray started here divided among the replicas (1 on an existing "
                                               "cluster).")
    max_batch_size: int = Field(32, ge=1, description="Images per ONNX Runtime call, and per request.")
    max_wait_ms: float = Field(5.0, ge=0, description="How long a batch waits to fill, in milliseconds.")
    max_body_mb: float = Field(64.0, ge=0, description="Largest request body, in MiB.")
    max_pixels: int = Field(MAX_PIXELS, ge=1, description="Largest image a request may send, in pixels (as "
                                                          "`reprotune predict`).")
    log_requests: str | None = Field(None, description="Keep the newest classified images here, as PNG with "
                                                       "their predictions beside them, for `reprotune monitor`.")
    log_max_images: int = Field(10_000, ge=1, description="Images --log-requests keeps (oldest deleted first).")
    log_max_mb: float = Field(512.0, ge=0, description="MiB of PNG --log-requests keeps.")

    @model_validator(mode="after")
    def _autoscaling_range(self) -> Settings:
        if self.max_replicas and self.max_replicas < self.replicas:
            raise ValueError(f"max_replicas must be 0 (no autoscaling) or at least replicas ({self.replicas}) "
                             f"(got {self.max_replicas})")
        return self

    @classmethod
    def checked(cls, values: dict) -> Settings:
        """Settings from `values` (a config file's `args:`, the CLI's options), or one line naming the
        first wrong or unknown one."""
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            error = exc.errors()[0]
            key = ".".join(str(part) for part in error["loc"])
            if error["type"] == "extra_forbidden":
                unknown = ", ".join(sorted(set(values) - set(cls.model_fields)))
                raise ReprotuneError(f"serve: unknown argument(s) {unknown} (known: {', '.join(cls.model_fields)})"
                                     ) from None
            message = error["msg"].removeprefix("Value error, ")
            if not key:  # a check across fields: its message names them and their values
                raise ReprotuneError(f"serve: {message}") from None
            raise ReprotuneError(f"serve: {key}: {message} (got {error.get('input')!r})") from None

    def with_threads(self, cpus: int | None) -> Settings:
        """`threads` 0 (auto) made a number: `cpus` (those of a Ray started here) divided among the
        replicas, or one per replica on a running cluster (`cpus` None), whose deployment options say
        how many CPUs each gets. Other values are kept."""
        if self.threads:
            return self
        return self.model_copy(update={"threads": 1 if cpus is None else max(1, cpus // self.replicas)})

    def contract(self) -> Contract:
        """The model's contract from its card, and this server's limits; a one-line error if the file or
        its card is missing."""
        # Here, not at the top: the CLI imports this module for every command, to build serve's options.
        from reprotune.files import file_md5
        from reprotune.inference.modelcard import input_side, load_card
        from reprotune.inference.protocol import Contract

        path = Path(self.model)
        if not path.is_file():
            raise ReprotuneError(f"{path}: model not found (run `make demo` or `dvc repro` first)")
        if path.suffix != ".onnx":
            raise ReprotuneError(f"{path}: the server runs ONNX exports (models/model.onnx)")
        card = load_card(path)
        version = file_md5(path)[:12]  # which exact file answered
        return Contract(self.name, version, card["classes"], input_side(card), self.max_batch_size, self.max_pixels)

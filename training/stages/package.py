"""DVC stage `package`: artifacts/finetune/model.pth -> model-store/imgtocap.mar, self-contained.

The archive carries everything the handler loads, so the serving Python needs torch,
torchvision, transformers and pillow, not imgtocap:

    imgtocap.mar
      imgtocap_handler.py   handler/imgtocap_handler.py (TorchServe imports it by this name)
      model.pth             the checkpoint ({config, state_dict})
      domain.pt             the in-domain check (model/domain.py), when the checkpoint has one
      model/                the captioner's code; the handler imports it from here
      tokenizer/            vocab.txt, tokenizer.json, tokenizer_config.json
      handler.json          per-request defaults and limits (params.yaml serve:)
      model-config.yaml     TorchServe: batchSize, maxBatchDelay, responseTimeout, workers
      MODEL_CARD.md         reports/model_card.md: data, metrics, architecture, known limits
      registered.json       which registered model and version this is, and the MLflow run
      MAR-INF/MANIFEST.json modelVersion: the registered version (describe and responses say it)

The archive's version is the registered version `evaluate` wrote to
artifacts/model/registered.json ("unregistered" when training ran without tracking); the
archive is then logged to the run that holds that version.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from model import CaptionerConfig, read_checkpoint
from model.domain import FILENAME as DOMAIN_FILE
from model.image import DEFAULT_MAX_PIXELS
from model.options import CPU_DECODER, CPU_DECODERS, MAX_BEAMS, MAX_LENGTH, Decoding
from model.tokenizer import save_tokenizer
from training.data.checksums import file_sha256
from training.params import ParamsError, from_section, load_params, stage_main
from training.paths import ARCHIVE_PATH, CARD_PATH, FINETUNED_PATH, MODEL_NAME, REGISTERED_PATH
from training.tracking import runs as tracking
from training.tracking.model_card import retitle
from training.tracking.registry import MODEL_PACKAGE, Registered, log_archive

log = logging.getLogger(__name__)

# handler/ sits beside training/ in a checkout and in an install (setup.py ships both)
HANDLER = Path(__file__).resolve().parents[2] / "handler" / "imgtocap_handler.py"
# torch-model-archiver's command line, run by this Python (no PATH lookup, no runpy warning)
ARCHIVER_CLI = (
    "from model_archiver.model_packaging import generate_model_archive; generate_model_archive()"
)


# measured: TorchServe 0.12 describes a model packaged with maxBatchDelay 0 as 100
NO_ZERO_DELAY = (
    " (TorchServe 0.12 reads 0 as unset and waits its default 100 ms per batch; 1 is the "
    "shortest wait)"
)


@dataclass
class ServeConfig:
    """params.yaml `serve:`: TorchServe batching and workers, and the handler's request limits."""

    batch_size: int = 8  # requests captioned together at most
    max_batch_delay_ms: int = 5  # how long TorchServe waits to fill a batch (bench/serving.py)
    response_timeout_s: int = 120  # a batch running longer than this restarts the worker
    min_workers: int = 1
    max_workers: int = 1
    # per-request parameters: the default, and the most a request may ask for (the least is 1)
    num_beams: dict[str, int] = field(
        default_factory=lambda: {"default": Decoding.num_beams, "max": MAX_BEAMS}
    )
    max_length: dict[str, int] = field(
        default_factory=lambda: {"default": Decoding.max_length, "max": MAX_LENGTH}
    )
    # per request likewise, from 0 (off) to max_length.max: no n-gram twice in a caption
    no_repeat_ngram_size: int = Decoding.no_repeat_ngram_size
    max_image_bytes: int = 8 * 2**20  # below config.properties' max_request_size (10 MiB)
    max_pixels: int = DEFAULT_MAX_PIXELS  # read from the header, refused before decoding
    cpu_threads: int = 0  # torch threads per CPU worker; 0 = the CPUs available / max_workers
    cpu_decoder: str = CPU_DECODER  # int8 | fp32 on CPU workers (model/int8.py); GPUs: as saved

    def __post_init__(self) -> None:
        for name in ("batch_size", "response_timeout_s", "min_workers", "max_image_bytes"):
            _check(name, getattr(self, name), minimum=1)
        _check("cpu_threads", self.cpu_threads, minimum=0)
        if self.cpu_decoder not in CPU_DECODERS:
            raise ValueError(
                f"serve.cpu_decoder must be one of {CPU_DECODERS}, got {self.cpu_decoder!r}"
            )
        _check("max_batch_delay_ms", self.max_batch_delay_ms, minimum=1, hint=NO_ZERO_DELAY)
        _check("max_pixels", self.max_pixels, minimum=1)
        _check("no_repeat_ngram_size", self.no_repeat_ngram_size, minimum=0)
        _check("max_workers", self.max_workers, minimum=self.min_workers)
        for name in ("num_beams", "max_length"):
            spec = getattr(self, name)
            if not isinstance(spec, dict) or set(spec) != {"default", "max"}:
                raise ValueError(
                    f"serve.{name} must be a mapping {{default: N, max: M}}, got {spec!r}"
                )
            _check(f"{name}.max", spec["max"], minimum=1)
            _check(f"{name}.default", spec["default"], minimum=1, maximum=spec["max"])

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> ServeConfig:
        """Build from params.yaml's `serve:` mapping; an unknown key is an error."""
        return from_section(cls, values, "serve")

    def model_config(self) -> dict[str, int]:
        """TorchServe's model-config yaml (read when the archive is loaded)."""
        return {
            "minWorkers": self.min_workers,
            "maxWorkers": self.max_workers,
            "batchSize": self.batch_size,
            "maxBatchDelay": self.max_batch_delay_ms,
            "responseTimeout": self.response_timeout_s,
        }

    def handler_settings(self) -> dict[str, Any]:
        """handler.json: what the handler needs per request, and how it runs the decoder."""
        keys = (
            "num_beams",
            "max_length",
            "no_repeat_ngram_size",
            "max_image_bytes",
            "max_pixels",
            "cpu_threads",
            "cpu_decoder",
        )
        return {key: getattr(self, key) for key in keys}


def _check(name: str, value: Any, minimum: int, maximum: int | None = None, hint: str = "") -> None:
    """An integer within [minimum, maximum], or an error naming the params.yaml key."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"serve.{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and <= {maximum}"
        raise ValueError(f"serve.{name} must be >= {minimum}{upper}, got {value}{hint}")


def build_archive(
    checkpoint: Path,
    out_dir: Path,
    params: ServeConfig | Mapping[str, Any],
    registered: Registered | None = None,
    card: Path | None = None,
) -> Path:
    """Package a checkpoint with the handler, model code and tokenizer as out_dir/imgtocap.mar,
    stamped with the registered version (and carrying the model card) when given.

    `params` may also be a `serve:` mapping (the tests' and bench/serving.py's), parsed as
    params.yaml's is.
    """
    registered = registered or Registered()
    if not isinstance(params, ServeConfig):
        params = ServeConfig.from_dict(params)
    config = CaptionerConfig.from_dict(read_checkpoint(checkpoint)["config"])
    if params.max_length["max"] >= config.max_position:
        raise ParamsError(
            f"serve.max_length.max={params.max_length['max']} is too long for this model "
            f"(max_position={config.max_position}): set it below {config.max_position}"
        )
    with tempfile.TemporaryDirectory(prefix="imgtocap-package-") as tmp:
        # --extra-files copies a directory's CONTENTS into the archive root, so the files that
        # must keep their folder (model/, tokenizer/) are staged one level down.
        stage = Path(tmp) / "extra"
        shutil.copytree(
            MODEL_PACKAGE, stage / "model", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
        save_tokenizer(config.tokenizer, stage / "tokenizer")
        if (domain := Path(checkpoint).with_name(DOMAIN_FILE)).is_file():  # beside model.pth
            shutil.copyfile(domain, stage / DOMAIN_FILE)
        (stage / "handler.json").write_text(json.dumps(params.handler_settings(), indent=2) + "\n")
        registered.save(stage / "registered.json")
        if card is not None:  # with the version this archive is stamped with
            text = card.read_text(encoding="utf-8")
            if registered.run_id:
                text = retitle(text, registered.name, registered.archive_version())
            (stage / "MODEL_CARD.md").write_text(text, encoding="utf-8")
        model_config = Path(tmp) / "model-config.yaml"
        model_config.write_text(yaml.safe_dump(params.model_config(), sort_keys=False))
        export = Path(tmp) / "export"
        export.mkdir()
        command = [
            sys.executable, "-c", ARCHIVER_CLI,
            "--model-name", MODEL_NAME,
            "--version", registered.archive_version(),
            "--serialized-file", str(checkpoint),
            "--handler", str(HANDLER),
            "--extra-files", str(stage),
            "--config-file", str(model_config),
            "--export-path", str(export),
            "--force",
        ]  # fmt: skip
        # The archiver assembles files in $TMPDIR/<model name> and deletes whatever is there:
        # a private TMPDIR keeps two builds from clobbering each other.
        subprocess.run(command, check=True, env={**os.environ, "TMPDIR": tmp})
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / f"{MODEL_NAME}.mar"
        partial = out_dir / f".{MODEL_NAME}.mar.partial"
        shutil.copyfile(export / f"{MODEL_NAME}.mar", partial)
        os.replace(partial, target)  # a reader never sees half an archive
    return target


@stage_main
def main() -> None:
    """Package artifacts/finetune/model.pth with params.yaml's serve settings."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    serve = load_params().get("serve")
    if not serve:
        log.warning("params.yaml has no serve: section; packaging with the defaults")
    registered = Registered.load(REGISTERED_PATH)
    archive = build_archive(
        FINETUNED_PATH, ARCHIVE_PATH.parent, ServeConfig.from_dict(serve), registered, CARD_PATH
    )
    log.info(
        "wrote %s (%.1f MB), version %s",
        archive,
        archive.stat().st_size / 1e6,
        registered.archive_version(),
    )
    track(registered, archive, FINETUNED_PATH)


def track(registered: Registered, archive: Path, checkpoint: Path) -> None:
    """Log the archive to the evaluation's run (once per checkpoint) and tag its registered
    version; a failure is a warning, never a failure."""
    if registered.run_id is None:
        log.info("no MLflow run in %s: the archive is not logged", REGISTERED_PATH)
        return
    down = tracking.unreachable_server()
    if down:
        log.warning("MLflow server %s does not answer: the archive is not logged", down)
        return
    try:
        tracking.configure()
        log_archive(registered, archive, file_sha256(checkpoint))
    except Exception as exc:  # a record, not a result: the archive is written
        log.warning(
            "logging %s to run %s (archive version %s) failed (%s: %s)",
            archive,
            registered.run_id,
            registered.archive_version(),
            type(exc).__name__,
            exc,
        )


if __name__ == "__main__":
    main()

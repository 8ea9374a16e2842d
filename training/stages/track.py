"""DVC stage `track` (always_changed: runs on every `dvc repro` / `dvc exp run`): make the
server named by MLFLOW_TRACKING_URI (else the repository's mlflow.db) hold the run of the
workspace's model and evaluation, and write its registered version for `package`
(artifacts/model/registered.json). See training/tracking/publish.py.
"""

from __future__ import annotations

import logging

from training.params import load_params, stage_main
from training.paths import (
    ATTENTION_PATH,
    CARD_PATH,
    EVAL_METRICS_PATH,
    FINETUNED_PATH,
    HISTORY_PATH,
    PREDICTIONS_PATH,
    PROCESSED_PATH,
    RAW_DIR,
    REGISTERED_PATH,
    ROBUSTNESS_PATH,
    RUN_FILE,
    SAMPLES_PATH,
)
from training.tracking.publish import Evaluated, publish

FILES = (EVAL_METRICS_PATH, PREDICTIONS_PATH, SAMPLES_PATH, ATTENTION_PATH, ROBUSTNESS_PATH)


@stage_main
def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    evaluated = Evaluated(
        FINETUNED_PATH,
        EVAL_METRICS_PATH,
        CARD_PATH,
        PROCESSED_PATH,
        RAW_DIR,
        HISTORY_PATH,
        RUN_FILE,
        FILES,
    )
    publish(evaluated, load_params()).save(REGISTERED_PATH)


if __name__ == "__main__":
    main()

"""Where the pipeline's stages read and write, relative to the repository root.

`dvc.yaml` names the same files as each stage's deps and outs (tests/test_paths.py checks that
they agree, and that RESUME_DIR is no output); a stage takes its paths from here, never from
another stage's module. The layout inside `data/raw/` is training.data.captions'.
"""

from __future__ import annotations

from pathlib import Path

# The model's name: the archive's, TorchServe's (/predictions/imgtocap), the CLI's default URL
MODEL_NAME = "imgtocap"

# source -> ingest -> validate -> preprocess
SOURCE_PATH = Path("data/source.json")  # fingerprint of the dataset outside the repository
RAW_DIR = Path("data/raw")
REPORT_PATH = Path("reports/validation.json")
PROCESSED_DIR = Path("data/processed")
PROCESSED_PATH = PROCESSED_DIR / "captions.json"

# transform: `<split>.npy` features (n, N, C) fp16, their index, and the encoder weights used;
# the training views (n, views, N, C) and one (n, N, C) file per perturbed copy of the test split
FEATURES_DIR = Path("data/features")
FEATURES_INDEX = "index.json"
ENCODER_WEIGHTS = "encoder.pth"
TRAIN_VIEWS = "train_views.npy"
ROBUST_DIR = "robust"

# domain: the in-domain check, beside the checkpoint (model.domain.FILENAME), and its numbers
DOMAIN_PATH = Path("artifacts/finetune/domain.pt")
DOMAIN_METRICS_PATH = Path("metrics/domain.json")

# define
CONFIG_PATH = Path("artifacts/model/config.json")
SUMMARY_PATH = Path("reports/model_size.json")  # parameter counts: not metrics

# train
MODEL_PATH = Path("artifacts/model/model.pth")
RUN_FILE = Path("artifacts/model/mlflow.json")  # the MLflow run evaluate adds to
TRAIN_METRICS_PATH = Path("metrics/train.json")
HISTORY_PATH = Path("metrics/train_history.csv")

# finetune: the model evaluate and package read (train's model.pth itself, hard-linked, when off)
FINETUNED_PATH = Path("artifacts/finetune/model.pth")
FINETUNE_METRICS_PATH = Path("metrics/finetune.json")
FINETUNE_HISTORY_PATH = Path("metrics/finetune_history.csv")  # the reward per epoch

# The resumable state of an unfinished training run, and the lock that keeps one trainer per
# workspace: deliberately NOT a DVC output (training/runtime/resume.py says why).
RESUME_DIR = Path("artifacts/resume")
TRAIN_LOCK = RESUME_DIR / "train.lock"

# evaluate
EVAL_METRICS_PATH = Path("metrics/eval.json")
PREDICTIONS_PATH = Path("reports/predictions.jsonl")
SAMPLES_PATH = Path("reports/samples.png")
ROBUSTNESS_PATH = Path("reports/robustness.jsonl")  # every perturbed test caption
ATTENTION_PATH = Path("reports/attention.png")
CARD_PATH = Path("reports/model_card.md")
REGISTERED_PATH = Path("artifacts/model/registered.json")  # the version package stamps

# package: TorchServe's model store, the archive named for the model (/predictions/imgtocap)
ARCHIVE_PATH = Path("model-store") / f"{MODEL_NAME}.mar"

"""Caption metrics: the COCO caption evaluation (pycocoevalcap) and the synthetic content metric.

`caption_metrics` scores as the COCO evaluation server does: PTB-tokenise predictions and
references, then BLEU-1..4, METEOR, ROUGE-L and CIDEr at corpus level. SPICE is left out: it
downloads Stanford CoreNLP on first use, which fails offline. Java runs the tokenizer and
METEOR; METEOR's JVM (~5-7 s to load its paraphrase tables) is started once per process.
"""

from __future__ import annotations

import functools
import logging
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from training.data.synthetic import Scene, content_breakdown, content_correct

log = logging.getLogger(__name__)

JAVA_HINT = (
    "the COCO caption metrics (pycocoevalcap's PTB tokenizer and METEOR) run on Java, and "
    "`java` is not on PATH: install a Java runtime (8 or newer), e.g. "
    "`apt-get install default-jre-headless`, `brew install openjdk` or "
    "`conda install -c conda-forge openjdk`"
)


def caption_metrics(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr of one caption per image against all its references."""
    if not predictions:
        raise ValueError("no predictions to score")
    missing = [image for image in predictions if not references.get(image)]
    if missing:
        raise ValueError(
            f"{len(missing)} predicted image(s) have no reference captions, e.g. {missing[:3]}: "
            "score against the split the predictions were made for"
        )
    if shutil.which("java") is None:
        raise RuntimeError(JAVA_HINT)
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as exc:
        raise ImportError("caption metrics need pycocoevalcap: pip install pycocoevalcap") from exc

    images = sorted(predictions)
    meteor = _meteor()  # the JVM loads while the tokenizer runs
    gts = ptb_tokenize({image: list(references[image]) for image in images})
    res = ptb_tokenize({image: [predictions[image]] for image in images})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"bleu{n}": bleu[n - 1] for n in range(1, 5)}
    scores["meteor"] = _meteor_score(meteor, gts, res)
    scores["rouge_l"], _ = Rouge().compute_score(gts, res)
    scores["cider"], _ = Cider().compute_score(gts, res)
    return {key: float(value) for key, value in scores.items()}


def ptb_tokenize(captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Stanford PTBTokenizer, lowercased, punctuation removed: pycocoevalcap's, minus its quirks.

    pycocoevalcap's own wrapper writes its input file into its package folder (fails where
    site-packages is read-only, e.g. a container run as non-root) and silently drops captions
    when line counts disagree; this one uses the system temp dir and checks the count.
    """
    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = Path(ptbtokenizer.__file__).parent / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR
    keys = [key for key, caps in captions.items() for _ in caps]
    # one caption per line: any whitespace run (newlines included) becomes one space
    lines = [" ".join(caption.split()) for caps in captions.values() for caption in caps]
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        cmd = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer"]
        cmd += ["-preserveLines", "-lowerCase", "-encoding", "utf-8", f.name]
        done = subprocess.run(cmd, capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"PTBTokenizer failed (exit {done.returncode}): {done.stderr.decode()[-500:]}"
        )
    out = done.stdout.decode("utf-8").split("\n")[: len(lines)]
    if len(out) != len(lines):
        raise RuntimeError(f"PTBTokenizer returned {len(out)} lines for {len(lines)} captions")
    tokenized: dict[str, list[str]] = {key: [] for key in captions}
    for key, line in zip(keys, out):
        words = [w for w in line.rstrip().split(" ") if w and w not in ptbtokenizer.PUNCTUATIONS]
        tokenized[key].append(" ".join(words))
    return tokenized


def warm_up() -> None:
    """Start METEOR's JVM now: it loads (5-15 s) in the background until caption_metrics needs it."""
    _meteor()


@functools.cache
def _meteor() -> Any:
    """One METEOR process per Python process: its start-up dominates small evaluations."""
    if shutil.which("java") is None:
        raise RuntimeError(JAVA_HINT)
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def _meteor_score(meteor: Any, gts: dict[str, list[str]], res: dict[str, list[str]]) -> float:
    try:
        score, _ = meteor.compute_score(gts, res)
    except Exception:
        # Its line protocol is now out of step and it may hold its lock (its __del__ would then
        # hang): release, kill and forget it, so the next call starts a fresh one.
        _meteor.cache_clear()
        if meteor.lock.locked():
            meteor.lock.release()
        meteor.meteor_p.kill()
        raise
    return score


def content_metrics(
    predictions: Mapping[str, str], scenes: Mapping[str, Scene]
) -> tuple[dict[str, float], dict[str, dict[str, bool | None]]]:
    """Synthetic content accuracy and its breakdown rates; also each image's flags.

    Rates: `content_accuracy` (every object's colour and shape, and the relation, right),
    `objects_accuracy`, `colour_accuracy`, `shape_accuracy`, `count_accuracy` (as many objects
    as the scene, nothing stray), `relation_accuracy` (two-object scenes only), `size_accuracy`
    (captions that state a size; absent when none does).
    """
    missing = [image for image in predictions if image not in scenes]
    if missing:
        raise ValueError(
            f"{len(missing)} image(s) are not in scenes.json, e.g. {missing[:3]}: content "
            "accuracy needs the synthetic dataset the predictions were made on"
        )
    flags = {}
    for image, caption in predictions.items():
        flags[image] = {
            "correct": content_correct(caption, scenes[image]),
            **content_breakdown(caption, scenes[image]),
        }
    two = [image for image in flags if len(scenes[image].objects) == 2]
    sized = [f["size"] for f in flags.values() if f["size"] is not None]
    rates = {
        "content_accuracy": _mean(f["correct"] for f in flags.values()),
        "objects_accuracy": _mean(f["objects"] for f in flags.values()),
        "colour_accuracy": _mean(f["colour"] for f in flags.values()),
        "shape_accuracy": _mean(f["shape"] for f in flags.values()),
        "count_accuracy": _mean(f["count"] for f in flags.values()),
    }
    if two:
        rates["relation_accuracy"] = _mean(flags[image]["relation"] for image in two)
    if sized:
        rates["size_accuracy"] = _mean(sized)
    return rates, flags


def _mean(values: Any) -> float:
    values = [bool(v) for v in values]
    return sum(values) / len(values) if values else 0.0

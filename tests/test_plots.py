"""`dvc plots show` draws loss, learning rate and the self-critical reward per epoch, and the
page renders with no network.

The page DVC writes is opened in headless Chromium with every request that is not the file
itself refused: vega, vega-lite and vega-embed must come from the page (docs/plots/offline.html,
the template .dvc/config names), not from a CDN.
"""

from __future__ import annotations

import csv
import hashlib
import re

import pytest

from tests.helpers.project import ROOT, dvc, git, project_copy

HISTORY = [  # metrics/train_history.csv as train writes it
    {
        "epoch": epoch,
        "train_loss": round(3.0 / epoch + 0.5, 5),
        "val_loss": round(3.2 / epoch + 0.7, 5),
        "lr": round(3e-4 * (1 - (epoch - 1) / 6), 8),
        "seconds": 38.0 + epoch,
    }
    for epoch in range(1, 7)
]

FINETUNE_HISTORY = [  # metrics/finetune_history.csv as finetune writes it
    {"epoch": e, "reward": 2.6 + 0.1 * e, "baseline": 2.6 + 0.1 * e, "val_cider": 3.5 + 0.05 * e}
    | {"entropy": 1.0, "seconds": 600.0}
    for e in range(1, 4)
]


@pytest.fixture(scope="module")
def page_file(tmp_path_factory):
    """`dvc plots show` in a clone with a training history: the page it writes."""
    repo = project_copy(tmp_path_factory.mktemp("plots"))
    (repo / "metrics").mkdir(exist_ok=True)
    with (repo / "metrics" / "train_history.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(HISTORY[0]))
        writer.writeheader()
        writer.writerows(HISTORY)
    with (repo / "metrics" / "finetune_history.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(FINETUNE_HISTORY[0]))
        writer.writeheader()
        writer.writerows(FINETUNE_HISTORY)
    out = dvc(repo, "plots", "show")
    page = repo / "dvc_plots" / "index.html"
    assert page.as_uri() in out
    assert git(repo, "status", "--porcelain", "--", "dvc_plots") == ""  # ignored, not to commit
    return page


def test_the_template_carries_the_vendored_libraries_unchanged():
    template = (ROOT / "docs" / "plots" / "offline.html").read_text(encoding="utf-8")
    found = re.findall(
        r"<!-- (vega[-a-z]*) ([0-9.]+) \(([^,]+), sha256 ([0-9a-f]{64})\); BSD-3-Clause, "
        r"docs/plots/(LICENSE\.[-a-z]+) -->\n<script>\n(.*?)\n</script>",
        template,
        re.S,
    )
    assert [(name, version) for name, version, *_ in found] == [
        ("vega", "6.4.0"),
        ("vega-lite", "6.5.0"),
        ("vega-embed", "7.3.0"),
    ]
    for name, _, _, sha256, license_file, code in found:
        assert hashlib.sha256(code.encode()).hexdigest() == sha256, name
        assert (
            "Redistribution and use in source and binary forms"
            in (ROOT / "docs" / "plots" / license_file).read_text()
        )
    assert "{plot_divs}" in template and "{scripts}" not in template  # no CDN script tags
    assert "cdn.jsdelivr" not in template


@pytest.mark.subprocess  # dvc plots show
def test_plots_show_loss_and_learning_rate_per_epoch_offline(page_file, chromium, tmp_path):
    html = page_file.read_text(encoding="utf-8")
    assert "cdn.jsdelivr" not in html and "<script src=" not in html

    requests = []

    def only_the_page(route):
        requests.append(route.request.url)
        if route.request.url == page_file.as_uri():
            route.continue_()
        else:
            route.abort()

    page = chromium.new_page(viewport={"width": 1000, "height": 450})  # no names but loopback
    try:
        page.route("**/*", only_the_page)
        page.goto(page_file.as_uri())
        page.wait_for_function("window.plots && window.plots.length === 3", timeout=30_000)
        charts = page.evaluate(CHARTS)
        page.screenshot(path=str(tmp_path / "plots.png"))
    finally:
        page.close()

    assert requests == [page_file.as_uri()]  # nothing else was even asked for
    ids = ["Loss_per_epoch", "Learning_rate_per_epoch", "Self-critical_reward_per_epoch"]
    assert [c["id"] for c in charts] == ids
    loss, lr, reward = charts
    assert {"Self-critical reward per epoch", "epoch", "CIDEr-D"} <= set(reward["texts"])
    assert {
        float(r["epoch"]): float(r["reward"]) for r in reward["data"] if r["field"] == "reward"
    } == {row["epoch"]: row["reward"] for row in FINETUNE_HISTORY}
    assert {"Loss per epoch", "epoch", "loss", "train_loss", "val_loss"} <= set(loss["texts"])
    assert {"Learning rate per epoch", "epoch", "learning rate"} <= set(lr["texts"])
    for chart in charts:
        assert not {"seconds", "step"} & set(chart["texts"]), chart["texts"]

    # the series drawn: one line per field, a point per epoch, the values of the CSV
    epochs = len(HISTORY)
    assert sorted(line["label"].split("field: ")[-1] for line in loss["lines"]) == [
        "train_loss",
        "val_loss",
    ]
    assert len(lr["lines"]) == 1
    for line in loss["lines"] + lr["lines"]:
        assert line["points"] == epochs
    for field in ("train_loss", "val_loss"):
        drawn = {float(r["epoch"]): float(r[field]) for r in loss["data"] if r["field"] == field}
        assert drawn == {row["epoch"]: row[field] for row in HISTORY}
    assert {float(r["epoch"]): float(r["lr"]) for r in lr["data"]} == {
        row["epoch"]: row["lr"] for row in HISTORY
    }


# Per chart: its div's id, every SVG text, the line marks actually drawn (the first layer: the
# template repeats it for the hover highlight) and the data the chart was given.
CHARTS = """() => Array.from(document.querySelectorAll('.vega-embed')).map(embed => {
  const view = window.plots.find(v => embed.contains(v.container()));
  const paths = Array.from(embed.querySelectorAll('g.mark-line.layer_0_layer_0_marks path'));
  return {
    id: embed.closest('[id]').id,
    texts: Array.from(embed.querySelectorAll('svg text')).map(t => t.textContent),
    lines: paths.map(p => ({
      label: p.getAttribute('aria-label') || '',
      points: (p.getAttribute('d') || '').split(/[ML]/).filter(s => s.trim()).length,
    })),
    data: view.data('source_0'),
  };
})"""

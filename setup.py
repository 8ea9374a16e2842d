"""imgtocap: image captioning with a frozen CNN encoder and a causal BERT decoder."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def requirements(name: str) -> list[str]:
    """Pinned requirements from requirements/<name>.txt, following `-r` includes."""
    lines = []
    for line in (HERE / "requirements" / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            lines += requirements(line[3:].strip())
        elif line:
            lines.append(line)
    return lines


setup(
    name="imgtocap",
    version="0.1.0",
    description="Image captioning: frozen CNN encoder + causal BERT decoder, DVC, MLflow, TorchServe",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10,<3.13",
    packages=find_packages(
        include=["model", "model.*", "training", "training.*", "handler", "serve"]
    ),
    package_data={"serve": ["config.properties"]},  # the runner's default config
    install_requires=requirements("train.txt"),
    # `imgtocap caption PATH...`: in serve/, beside the server it talks to; not model/ (which
    # every .mar ships) nor training/ (the pipeline)
    entry_points={"console_scripts": ["imgtocap = serve.cli:main"]},
    extras_require={"dev": requirements("dev.txt")},
)

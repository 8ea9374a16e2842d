# TorchServe runtime for the archive that `dvc repro` (or `dvc pull`) leaves in model-store/.
#   docker build -t imgtocap .                                     CPU torch (the default)
#   docker build --build-arg TORCH_VARIANT=cu128 -t imgtocap:gpu .  CUDA torch
# TORCH_VARIANT names a wheel index at download.pytorch.org/whl/ (cpu, cu126, cu128, ...);
# TORCH_INDEX_URL replaces the whole URL (a mirror). The CUDA wheels bring the CUDA runtime and
# cuDNN with them, so a GPU image needs no CUDA base image; the node supplies only the driver (EKS
# GPU AMI + NVIDIA device plugin).
# Without Docker Hub or download.pytorch.org (docs/deployment-local.md): bases made by
# serve/bases.sh, and torch from a folder of wheels mounted into the build:
#   podman build --format docker --isolation chroot -v /opt/wheels:/wheels:ro \
#     --build-arg TORCH_FIND_LINKS=/wheels --build-arg PYTHON_IMAGE=... --build-arg JRE_IMAGE=... .
# `make image` does this from the environment (serve/serve.mk).
ARG PYTHON_IMAGE=python:3.11.16-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b
ARG JRE_IMAGE=eclipse-temurin:17-jre-noble@sha256:900322f4cc1b9da9d730ae4bb56d8a1dabbaa9cfa32809fc8b542b600370a045

# TorchServe's frontend needs Java 17. Temurin's JRE is self-contained, so copying it avoids apt
# and keeps the official Python 3.11 image (the version CI tests) as the base.
FROM ${JRE_IMAGE} AS jre

FROM ${PYTHON_IMAGE}
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ARG TORCH_FIND_LINKS=
ENV JAVA_HOME=/opt/java/openjdk \
    PATH=/opt/java/openjdk/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    OMP_WAIT_POLICY=PASSIVE \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=jre /opt/java/openjdk /opt/java/openjdk

# uid 1000 is what k8s/deployment.yaml's runAsUser names.
RUN useradd --no-log-init --create-home --home-dir /home/model-server --uid 1000 --user-group \
        --shell /usr/sbin/nologin model-server

# torch and torchvision first, without dependencies: from the index at the versions serve.txt pins,
# or, with TORCH_FIND_LINKS, whatever torch (and torchvision, if any) that folder holds and nothing
# from the network. The second install then takes everything else, torch's dependencies included,
# from PyPI at the versions requirements/constraints.txt locks (the dependencies of the
# dependencies too); torch's own pins are left out of it so that a folder's torch stands.
# dumb-init is PID 1 (see ENTRYPOINT). The folder's torch is unpinned by design (DL3013).
COPY requirements/serve.txt requirements/constraints.txt /tmp/
# hadolint ignore=DL3013
RUN set -eu; \
    if [ -n "$TORCH_FIND_LINKS" ]; then \
        pip install --no-cache-dir --no-deps --no-index --find-links "$TORCH_FIND_LINKS" torch \
        && { pip install --no-cache-dir --no-deps --no-index --find-links "$TORCH_FIND_LINKS" \
                torchvision || echo "no torchvision in $TORCH_FIND_LINKS: the handler runs without it"; }; \
    else \
        pip install --no-cache-dir --no-deps --index-url "$TORCH_INDEX_URL" --constraint /tmp/serve.txt \
            torch torchvision; \
    fi; \
    grep -Ev '^torch(vision)?==' /tmp/serve.txt > /tmp/requirements.txt; \
    grep -Ev '^torch(vision)?==' /tmp/constraints.txt > /tmp/locked.txt; \
    pip install --no-cache-dir --constraint /tmp/locked.txt --requirement /tmp/requirements.txt \
        torch dumb-init==1.2.5.post1; \
    rm /tmp/serve.txt /tmp/constraints.txt /tmp/requirements.txt /tmp/locked.txt

# Root-owned and read-only to the server; only its home (key_file.json, logs/) is its own.
WORKDIR /home/model-server
COPY serve/config.properties /home/model-server/config.properties
COPY k8s/probe.py /home/model-server/probe.py
# The page; in the pod an init container copies it to the proxy beside TorchServe (k8s/).
COPY serve/web /home/model-server/web
COPY model-store/imgtocap.mar /home/model-server/model-store/imgtocap.mar
USER 1000:1000

# Only inference listens beyond the container's loopback (serve/config.properties).
EXPOSE 8080
# Healthy while a tiny image gets a caption, with the inference key from key_file.json (the
# working directory): it fails when inference fails, a dead worker or a key gone stale alike,
# where /metrics only showed the JVM up. Kubernetes ignores HEALTHCHECK and uses the probes in
# k8s/deployment.yaml.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/home/model-server/probe.py", "http://127.0.0.1:8080/predictions/imgtocap"]
# The torchserve launcher installs no SIGTERM handler, and PID 1 ignores signals it does not
# handle: `docker stop` and pod deletion would wait out the grace period and SIGKILL. dumb-init
# forwards SIGTERM to the whole process group (launcher, JVM, workers).
ENTRYPOINT ["dumb-init", "--"]
CMD ["torchserve", "--foreground", "--ncs", "--ts-config", "/home/model-server/config.properties"]

#!/usr/bin/env bash
# Build the serving image (Dockerfile) around model-store/imgtocap.mar with docker or podman,
# whichever is installed; `make image` runs this after `dvc repro`. Environment, all optional:
#   IMAGE             the tag (imgtocap:latest)
#   ENGINE            docker or podman (the first of them on PATH)
#   PYTHON_IMAGE, JRE_IMAGE, TORCH_VARIANT, TORCH_INDEX_URL   build arguments (Dockerfile)
#   TORCH_FIND_LINKS  a folder of torch wheels to install from instead of an index (podman: the
#                     folder is mounted into the build; docker build cannot mount one)
#   BUILD_OPTS        more build flags, e.g. "--isolation chroot" (docs/deployment-local.md)
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-imgtocap:latest}
ENGINE=${ENGINE:-$(command -v docker || command -v podman || true)}
if [ -z "$ENGINE" ]; then
    echo "neither docker nor podman is installed (Debian: apt-get install podman buildah)" >&2
    exit 1
fi
if [ ! -f model-store/imgtocap.mar ]; then
    echo "model-store/imgtocap.mar is missing: dvc repro (or dvc pull model-store/imgtocap.mar)" >&2
    exit 1
fi

args=(build --tag "$IMAGE")
for var in PYTHON_IMAGE JRE_IMAGE TORCH_VARIANT TORCH_INDEX_URL; do
    if [ -n "${!var:-}" ]; then args+=(--build-arg "$var=${!var}"); fi
done
if [ "$(basename "$ENGINE")" = podman ]; then
    args+=(--format docker)  # the OCI format has no HEALTHCHECK: podman would drop it
fi
if [ -n "${TORCH_FIND_LINKS:-}" ]; then
    if [ "$(basename "$ENGINE")" != podman ]; then
        echo "TORCH_FIND_LINKS needs podman (docker build cannot mount a folder)" >&2
        exit 1
    fi
    args+=(--volume "$(realpath "$TORCH_FIND_LINKS"):/wheels:ro" --build-arg TORCH_FIND_LINKS=/wheels)
fi
# shellcheck disable=SC2206  # BUILD_OPTS is a list of flags
args+=(${BUILD_OPTS:-} .)

start=$SECONDS
"$ENGINE" "${args[@]}"
size=$("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE")
echo "built $IMAGE in $((SECONDS - start)) s: $((size / 1000000)) MB"

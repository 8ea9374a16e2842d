#!/usr/bin/env bash
# The Dockerfile's two base images made from Debian packages, for machines that cannot pull from
# Docker Hub (a user with Docker Hub keeps the pinned official bases: nothing to run here).
#   serve/bases.sh            -> localhost/imgtocap-python:3.11-bookworm, localhost/imgtocap-jre:17-bookworm
#                                and localhost/imgtocap-nginx:bookworm (the pod's proxy, for a
#                                local `podman kube play`: docs/deployment-local.md)
#   make image PYTHON_IMAGE=localhost/imgtocap-python:3.11-bookworm JRE_IMAGE=localhost/imgtocap-jre:17-bookworm
# Needs root (mmdebstrap in root mode), podman and mmdebstrap (Debian packages); 2-4 minutes each.
# MIRROR: the Debian mirror (default deb.debian.org). An image that already exists is kept.
set -euo pipefail

PYTHON_IMAGE=${PYTHON_IMAGE:-localhost/imgtocap-python:3.11-bookworm}
JRE_IMAGE=${JRE_IMAGE:-localhost/imgtocap-jre:17-bookworm}
NGINX_IMAGE=${NGINX_IMAGE:-localhost/imgtocap-nginx:bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
# `podman import` leaves PATH unset; without it `podman kube play` finds no binaries.
PATH_ENV='ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
# Python 3.11: what CI tests and the official python:3.11 base carries.
PYTHON_PACKAGES=python3,python3-pip,python3-venv,python-is-python3,ca-certificates

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

base() {  # base IMAGE PACKAGES [mmdebstrap options...]: debootstrap bookworm into IMAGE
    local image=$1 packages=$2
    shift 2
    if podman image exists "$image"; then
        echo "$image exists; podman rmi it to rebuild"
        return
    fi
    mmdebstrap --variant=minbase --include="$packages" "$@" bookworm "$work/rootfs.tar" "$MIRROR"
    podman import --change "$PATH_ENV" "$work/rootfs.tar" "$image"
    rm -f "$work/rootfs.tar"
}

# pip installs into the system Python, as in the official python image: Debian's PEP 668 marker
# would refuse that.
base "$PYTHON_IMAGE" "$PYTHON_PACKAGES" \
    --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED'
# The Dockerfile copies /opt/java/openjdk out of the JRE image (Temurin's layout). Debian's JRE
# links its config and CA store from /etc, so the copy dereferences those links to stand alone;
# its shared libraries (zlib, libc) are in every bookworm base. The JRE's postinst needs the man
# directory that minbase leaves out.
base "$JRE_IMAGE" openjdk-17-jre-headless \
    --essential-hook='mkdir -p "$1/usr/share/man/man1"' \
    --customize-hook='mkdir -p "$1/opt/java" && cp -rL "$1"/usr/lib/jvm/java-17-openjdk-amd64 "$1/opt/java/openjdk"'
# The proxy runs `nginx -c <the pod's config>` (k8s/deployment.yaml), which sets every path
# nginx writes to; Debian's nginx-light serves it like the pinned nginx-unprivileged image.
base "$NGINX_IMAGE" nginx-light
podman images --filter reference="$PYTHON_IMAGE" --filter reference="$JRE_IMAGE" \
    --filter reference="$NGINX_IMAGE"

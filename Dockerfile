# minichat worker image. Build context: the repository root (see .dockerignore).
#   docker build -t minichat .
#   docker run --rm --network host minichat minichat worker
# Every runtime dependency ships manylinux wheels, so the slim image needs no compiler.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# README.m[d]: pyproject.toml names README.md as the long description; the glob keeps the build
# working while that file does not exist yet.
COPY pyproject.toml constraints.txt README.m[d] ./
COPY minichat ./minichat
# constraints.txt: the locked versions (scripts/lock.py), the same ones CI's `make venv` installs
RUN pip install -c constraints.txt . \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin minichat

USER minichat
# health, metrics and read API (MINICHAT_WEB_PORT)
EXPOSE 6066
STOPSIGNAL SIGTERM
CMD ["minichat", "worker"]

# One image for every Python service (docker-compose.yml runs `python -m services.<name>`
# and the init steps from it). Same pinned packages and generated code as `make setup`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/app/.venv/bin:$PATH
WORKDIR /app

# Dependencies first: this layer is rebuilt only when the lock changes.
COPY requirements.lock ./
RUN python -m venv .venv && .venv/bin/pip install --no-cache-dir -r requirements.lock

# Then the project, installed and generated exactly as scripts/setup_venv.sh and
# scripts/gen_proto.sh do it natively (the .venv path is the same).
COPY pyproject.toml ./
COPY proto ./proto
COPY shared ./shared
COPY services ./services
COPY scripts/setup_venv.sh scripts/gen_proto.sh scripts/stack.py scripts/stack.toml ./scripts/
COPY scripts/kafka ./scripts/kafka
COPY scripts/redis ./scripts/redis
RUN .venv/bin/pip install --no-cache-dir --no-deps -e . \
    && bash scripts/gen_proto.sh \
    && echo /app/gen > "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/smartlev-generated.pth"

# Run as an unprivileged user. Services write only .run/ (the faust stages' local data
# directory, under the working directory): it must be theirs.
RUN useradd --system --uid 10001 --no-create-home smartlev \
    && mkdir -p /app/.run && chown smartlev /app/.run
USER smartlev

# docker-compose.yml sets the command per service.
CMD ["python", "-c", "print('smartlev image: run `python -m services.<name>`')"]

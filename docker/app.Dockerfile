# pgflow-sa and your app. The build fetches the pinned pgflow SQL with npm, so
# Node.js is needed while building; build from the repository root:
#   docker build -f docker/app.Dockerfile .
FROM python:3.12-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends nodejs npm \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir .
# the image runs the worker for APP (override with your own flows)
ENV APP=examples.docker_flows:registry
CMD ["sh", "-c", "pgflow-sa worker \"$APP\""]

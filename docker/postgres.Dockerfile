# PostgreSQL 17 with the pgmq and pg_cron extensions (from the PGDG packages the
# official image already uses).
FROM postgres:17
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql-17-pgmq postgresql-17-cron \
    && rm -rf /var/lib/apt/lists/*
CMD ["postgres", "-c", "shared_preload_libraries=pg_cron", "-c", "cron.database_name=app"]

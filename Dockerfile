FROM python:3.12-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY openai_forward ./openai_forward
RUN pip install --no-cache-dir . \
    && useradd --system --no-create-home gateway \
    && mkdir /data && chown gateway /data
USER gateway
# forward keys live here: keep it on a volume, and run `keys` commands with docker exec
ENV OPENAI_FORWARD_DATABASE=/data/openai-forward.db
VOLUME /data
EXPOSE 8000
STOPSIGNAL SIGTERM
CMD ["openai-forward", "run", "--host", "0.0.0.0", "--port", "8000"]

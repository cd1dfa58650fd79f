# vitserve CPU image: the gateway with the embedded ONNX Runtime and a default model repository.
# GPU pools run Triton Inference Server on the same repository (see deploy/ and README).
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
# The CPU build of torch: the default index would pull several GB of CUDA wheels.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
COPY models models
COPY export export
COPY service service
RUN pip install .

# Export the default repositories at build time so the image serves out of the box; mount a
# volume at /models to serve your own checkpoints instead. The backbones and shapes are the
# Makefile's defaults (`make export`, README "Shapes"; tests/test_deploy.py holds the two equal), and
# build arguments override them as make's variables do. /models holds fp32 entries for the CPU
# (vitserve's embedded ONNX Runtime); /models-gpu the same backbones and shapes in fp16 with their
# Triton instances on the GPU, for the gpu overlay's Triton pools (and its gateway, which reads the
# same configs). Precision and placement are separate flags: fp16 alone would still leave placement
# to Triton.
FROM base AS repository
ARG GLOBAL_MODEL=vit_small_patch16_224
ARG GLOBAL_BUCKETS=224,384x128,336x144,288x160,256x192,192x256,160x288,144x336,128x384
ARG WINDOWED_MODEL=swin_tiny_patch4_window7_224
ARG WINDOWED_BUCKETS=448,896,756x252,700x308,588x336,532x392,392x532,336x588,308x700,252x756,1568x532,1372x588,1204x672,1008x756,756x1008,672x1204,588x1372,532x1568
RUN vitserve export --model "$GLOBAL_MODEL" --name vit_global --buckets "$GLOBAL_BUCKETS" --repository /models \
    && vitserve export --model "$WINDOWED_MODEL" --name swin_windowed --buckets "$WINDOWED_BUCKETS" \
       --repository /models
RUN vitserve export --model "$GLOBAL_MODEL" --name vit_global --buckets "$GLOBAL_BUCKETS" \
       --precision fp16 --instance-kind gpu --repository /models-gpu \
    && vitserve export --model "$WINDOWED_MODEL" --name swin_windowed --buckets "$WINDOWED_BUCKETS" \
       --precision fp16 --instance-kind gpu --repository /models-gpu

FROM base
RUN useradd --create-home --uid 10001 vitserve
COPY --from=repository --chown=vitserve /models /models
COPY --from=repository --chown=vitserve /models-gpu /models-gpu
# By uid, so Kubernetes can check runAsNonRoot without resolving the name (hadolint DL3066).
USER 10001
ENV VITSERVE_HOST=0.0.0.0 \
    VITSERVE_PORT=8000 \
    VITSERVE_REPOSITORY=/models
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready')"]
ENTRYPOINT ["vitserve"]
CMD ["serve"]

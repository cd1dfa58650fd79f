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
# volume at /models to serve your own checkpoints instead. /models holds fp32 entries for the CPU
# (vitserve's embedded ONNX Runtime); /models-gpu the same backbones and buckets in fp16 with their
# Triton instances on the GPU, for the gpu overlay's Triton pools (and its gateway, which reads the
# same configs). Precision and placement are separate flags: fp16 alone would still leave placement
# to Triton.
FROM base AS repository
RUN vitserve export --model vit_tiny_patch16_224 --name vit_global --buckets 224,384 --repository /models \
    && vitserve export --model swin_tiny_patch4_window7_224 --name swin_windowed --buckets 448,672,896,1344 \
       --repository /models
RUN vitserve export --model vit_tiny_patch16_224 --name vit_global --buckets 224,384 \
       --precision fp16 --instance-kind gpu --repository /models-gpu \
    && vitserve export --model swin_tiny_patch4_window7_224 --name swin_windowed --buckets 448,672,896,1344 \
       --precision fp16 --instance-kind gpu --repository /models-gpu

FROM base
RUN useradd --create-home --uid 10001 vitserve
COPY --from=repository --chown=vitserve /models /models
COPY --from=repository --chown=vitserve /models-gpu /models-gpu
USER vitserve
ENV VITSERVE_HOST=0.0.0.0 \
    VITSERVE_PORT=8000 \
    VITSERVE_REPOSITORY=/models
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready')"]
ENTRYPOINT ["vitserve"]
CMD ["serve"]

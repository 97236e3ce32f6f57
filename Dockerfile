# Hugging Face Space (sdk: docker, app_port: 8501). Hosted mode: registry models only, limits on.
FROM python:3.11-slim
RUN useradd -m -u 1000 user
USER user
ENV HOME=/home/user PATH=/home/user/.local/bin:$PATH NOLN_HOSTED=1 PYTHONUNBUFFERED=1
WORKDIR /home/user/app
# requirements.txt installs this checkout's package (pip install -e .), so the source comes first.
COPY --chown=user . .
RUN pip install --no-cache-dir --user -r requirements.txt
EXPOSE 8501
# The README's command; .streamlit/config.toml sets port 8501 and headless mode.
CMD ["streamlit", "run", "app.py"]

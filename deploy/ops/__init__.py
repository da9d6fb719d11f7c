"""Scripts the image ships in /app/ops (probes and setup Jobs); see docs/deploy.md."""

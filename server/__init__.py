"""The matlora HTTP server (installed as ``matlora_server``): engine, rank policy, API and metrics."""

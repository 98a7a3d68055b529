"""Clients of the matlora server (installed as ``matlora_client``)."""

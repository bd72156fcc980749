"""petalflow Prefect flows: they wire tasks together and own the parameters."""

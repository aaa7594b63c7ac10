"""The momkd-fed ServerApp, strategy and simulation runner (Flower glue for the coordinator)."""

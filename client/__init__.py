"""The momkd-fed ClientApp (Flower glue for one site): resolve the site, unpack, call the engine, pack."""

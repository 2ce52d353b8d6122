"""One module per DVC stage: read validated params and inputs, call the library, write outputs atomically."""

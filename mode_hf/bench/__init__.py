"""The bundled benchmark: procedurally generated tasks (`tasks`), the evaluation harness (`evaluation`), the
bundled models (`assets/`, their configs in `models`) and their offline processor (`processor`), and the demo
(`demo`). Imported lazily by the command line; `import mode_hf` imports only `processor`, to register it.
"""

"""Using an exported model without its framework: ``cxrbench predict``, ``cxrbench serve`` and results as tables.

Only numpy, Pillow and onnxruntime at import; FastAPI/uvicorn/prometheus-client (``[serve]``), pydicom
(``[dicom]``) and pandas (``[results]``) are imported by the command that needs them. The service's parts:
``serve`` (the application and the command), ``batching`` (one inference thread scoring concurrent requests
together), ``auth`` (bearer tokens), ``telemetry`` (metrics, the request log); ``loadtest`` measures it.
"""

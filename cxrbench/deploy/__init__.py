"""Using an exported model without its framework: ``cxrbench predict``, ``cxrbench serve`` and results as tables.

Only numpy, Pillow and onnxruntime at import; FastAPI/uvicorn (``[serve]``), pydicom (``[dicom]``) and
pandas (``[results]``) are imported by the command that needs them.
"""

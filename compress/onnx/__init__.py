"""ONNX: fp32 export validated against torch, the project's metadata, and the graph passes that shape int8 graphs."""

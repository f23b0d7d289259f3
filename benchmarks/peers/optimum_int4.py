"""int4 of an optimum ONNX export with onnxruntime's own weight-only quantizer (MatMulNBitsQuantizer).

    python optimum_int4.py OPTIMUM_EXPORT_DIR OUT_DIR [--block-size 32] [--accuracy-level 4]

Block 32 (as Q4_0, onnxruntime-genai's builder and smolexport), asymmetric (the quantizer's default), every
MatMul with a constant weight (the tied lm_head included when optimum exports it as a MatMul). The folder
keeps optimum's config and tokenizer files so ORTModelForCausalLM loads `model_int4.onnx` from it.
"""

import argparse
import shutil
from pathlib import Path

import onnx
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

parser = argparse.ArgumentParser()
parser.add_argument("source", type=Path)
parser.add_argument("output", type=Path)
parser.add_argument("--block-size", type=int, default=32)
parser.add_argument("--accuracy-level", type=int, default=4)
args = parser.parse_args()
args.output.mkdir(parents=True, exist_ok=True)
for f in args.source.iterdir():
    if f.suffix == ".json" or f.name.endswith(".jinja"):
        shutil.copy(f, args.output / f.name)
model = onnx.load(str(args.source / "model.onnx"))
quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=args.block_size, is_symmetric=False,
                                 accuracy_level=args.accuracy_level)  # fmt: skip
quantizer.process()
quantizer.model.save_model_to_file(str(args.output / "model_int4.onnx"), use_external_data_format=True)
print("wrote", args.output)

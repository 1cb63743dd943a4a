"""Writes the seed corpus of safetensors_fuzz: valid files (every dtype, empty tensors,
scalars, metadata, unaligned data) and one file per bad-input rule of the reader.

Usage: python3 make_seeds.py OUTDIR   (standard library only)
"""
import json
import os
import struct
import sys

out = sys.argv[1]
os.makedirs(out, exist_ok=True)


def st(header, data=b""):
    h = header if isinstance(header, bytes) else header.encode()
    return struct.pack("<Q", len(h)) + h + data


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


seeds = {
    "valid_two": st(json.dumps({"__metadata__": {"format": "pt"},
                                "w": entry("F32", [2, 2], 0, 16),
                                "b": entry("BF16", [3], 16, 22)}, separators=(",", ":")),
                    bytes(range(22))),
    "valid_empty_scalar": st('{"e":{"dtype":"F16","shape":[2,0],"data_offsets":[0,0]},'
                             '"s":{"dtype":"I64","shape":[],"data_offsets":[0,8]}}', b"\1" * 8),
    "valid_padded": st("{}      "),
    "valid_leading_ws": st(" \t{}"),
    "valid_f4": st('{"q":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}}', b"\x12\x34"),
    "empty": b"",
    "short": b"\x01\x02\x03",
    "n_past_end": struct.pack("<Q", 60),
    "n_max": struct.pack("<Q", 2**64 - 1) + b"{}",
    "n_over_cap": struct.pack("<Q", 100_000_001) + b"{}",
    "not_utf8": st(b'{"\xff":1}'),
    "overlong": st(b'{"\xc0\xaf":1}'),
    "surrogate": st(b'{"\xed\xa0\x80":1}'),
    "bom": st(b"\xef\xbb\xbf{}"),
    "not_json": st("hello"),
    "array": st("[1,2]"),
    "deep": st("[" * 5000),
    "nul_pad": st(b"{}\0\0\0\0\0\0"),
    "dup_same": st('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                   '"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x"),
    "dup_meta": st('{"__metadata__":{},"__metadata__":{}}'),
    "meta_int": st('{"__metadata__":{"k":1}}'),
    "meta_nested": st('{"__metadata__":{"k":{"x":"y"}}}'),
    "dtype_unknown": st('{"a":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}', b"\0" * 16),
    "dtype_lower": st('{"a":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4),
    "shape_neg": st('{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}', b"x"),
    "shape_float": st('{"a":{"dtype":"U8","shape":[1.5],"data_offsets":[0,1]}}', b"x"),
    "rank9": st('{"a":{"dtype":"U8","shape":[1,1,1,1,1,1,1,1,1],"data_offsets":[0,1]}}', b"x"),
    "wrap0": st('{"a":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,0]}}'),
    "overflow": st('{"a":{"dtype":"F32","shape":[2,18446744073709551614],"data_offsets":[0,16]}}',
                   b"\0" * 16),
    "f4_odd": st('{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}', b"xy"),
    "offsets_three": st('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}}', b"x"),
    "begin_gt_end": st('{"a":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}}', b"xxxx"),
    "hole": st('{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},'
               '"b":{"dtype":"U8","shape":[2],"data_offsets":[3,5]}}', b"12345"),
    "overlap": st('{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},'
                  '"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}', b"123456"),
    "same_offsets": st("{" + ",".join(f'"t{i}":{{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'
                                      for i in range(10)) + "}", b"\0" * 16),
    "info_small": st('{"a":{"dtype":"I32","shape":[2,2],"data_offsets":[0,4]}}', b"xxxx"),
    "past_file": st('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"xxxx"),
    "trailing": st('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"xPK\3\4"),
    "ctrl_name": st('{"a\\nb":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x"),
    "empty_name": st('{"":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x"),
    "extra_field": st('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":1}}', b"x"),
    "pickle": b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.",
    "zip": b"PK\x03\x04\x14\x00\x00\x00\x08\x00archive/data.pkl",
    "gguf": b"GGUF\x03\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00",
}
for name, data in seeds.items():
    with open(os.path.join(out, name), "wb") as f:
        f.write(data)
print(f"{len(seeds)} seeds in {out}")

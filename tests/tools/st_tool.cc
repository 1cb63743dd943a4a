// Test helper for the Python interop test (tests/interop/safetensors_interop.py):
//   st_tool dump PATH                  prints every tensor read through edgefuse as JSON:
//                                      {"metadata": {...}, "tensors": {name: {"dtype", "shape",
//                                      "hex"}}} (PATH: file, folder or index)
//   st_tool copy SRC DEST [MAX_SHARD]  re-writes SRC through CheckpointWriter (streamed from
//                                      the mapped source), sharded at MAX_SHARD bytes
#include <cstdio>
#include <cstdlib>
#include <string>

#include <nlohmann/json.hpp>

#include "edgefuse/io/checkpoint.h"

int main(int argc, char** argv) {
  try {
    const std::string cmd = argc > 1 ? argv[1] : "";
    if (cmd == "dump" && argc == 3) {
      const auto c = edgefuse::Checkpoint::open(argv[2]);
      nlohmann::json out;
      out["metadata"] = nlohmann::json::object();
      for (const auto& [k, v] : c.shards().at(0).metadata()) out["metadata"][k] = v;
      out["tensors"] = nlohmann::json::object();
      static const char* kHex = "0123456789abcdef";
      for (const auto& e : c.tensors()) {
        const auto v = e.file->view(*e.info);
        std::string hex;
        hex.reserve(2 * v.nbytes());
        for (std::uint64_t i = 0; i < v.nbytes(); ++i) {
          const auto b = static_cast<unsigned>(v.bytes()[i]);
          hex += kHex[b >> 4];
          hex += kHex[b & 15];
        }
        out["tensors"][e.info->name] = {
            {"dtype", std::string(edgefuse::dtype_name(e.info->dtype))},
            {"shape", std::vector<std::uint64_t>(e.info->shape.begin(), e.info->shape.end())},
            {"hex", hex}};
      }
      std::printf("%s\n", out.dump().c_str());
      return 0;
    }
    if (cmd == "copy" && (argc == 4 || argc == 5)) {
      const auto c = edgefuse::Checkpoint::open(argv[2]);
      edgefuse::WriteOptions opt;
      if (argc == 5) opt.max_shard_bytes = std::strtoull(argv[4], nullptr, 10);
      opt.metadata = c.shards().at(0).metadata();
      edgefuse::CheckpointWriter w(argv[3], opt);
      for (const auto& e : c.tensors()) w.add(e.info->name, e.file->view(*e.info));
      w.commit();
      return 0;
    }
    std::fprintf(stderr, "usage: st_tool dump PATH | st_tool copy SRC DEST [MAX_SHARD]\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}

// An `edgefuse-lab run` experiment: the target model, the clients and their text, the rounds
// and the methods to compare, read from a JSON file whose every key is known (an unknown key
// is an error naming it).
//
//   {"model": {"hidden": 128, "layers": 4, "heads": 16, "kv_heads": 8, "mlp": 384, "context": 64},
//    "rounds": 20, "local_steps": 25, "batch": 16, "lr": 0.003, "seeds": [0, 1, 2], "threads": 0,
//    "clients": [{"name": "laptop-en", "group": "en", "width": 1.0, "layers": 1.0,
//                 "data": ["/usr/share/games/fortunes/computers"]}, ...],
//    "heldout_fraction": 0.1, "eval_bytes": 0,
//    "proxy": {"files": ["..."], "bytes": 65536},
//    "distill": {"steps": 100, "batch": 16, "lr": 0.001, "temperature": 2.0, "rule": "mean_probs",
//                "policy": "fedrolex"},
//    "methods": ["largest_alone", "central", "heterofl", "fedrolex", "kd", "hybrid"]}
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace edgefuse::lab {

struct ModelShape {
  std::int64_t hidden = 128, layers = 4, heads = 16, kv_heads = 8, mlp = 384, context = 64;
  std::int64_t head_dim() const { return hidden / heads; }
};

struct ClientSpec {
  std::string name;
  std::string group;    // held-out bits per character are reported per group
  double width = 1.0;   // scales hidden, KV groups (with their query heads) and MLP
  double layers = 1.0;  // scales the depth
  std::vector<std::filesystem::path> data;
  bool full_size() const { return width == 1.0 && layers == 1.0; }
};

struct ProxySpec {
  std::vector<std::filesystem::path> files;
  std::int64_t bytes = 65536;  // at most this many bytes, an equal share from each file
};

struct DistillSpec {
  int steps = 100;                  // server optimizer steps per round
  std::int64_t batch = 16;          // proxy windows per step
  double lr = 1e-3;                 // the server's Adam
  double temperature = 2.0;         // of the teacher and the loss (with the T^2 factor)
  std::string rule = "mean_probs";  // a teacher rule of distill/teacher.h
  std::string policy = "fedrolex";  // how kd and hybrid cut the clients' sub-models
};

enum class Method { kLargestAlone, kCentral, kHeteroFL, kFedRolex, kKD, kHybrid };

struct Experiment {
  std::filesystem::path file;
  ModelShape model;
  int rounds = 20;
  int local_steps = 25;
  std::int64_t batch = 16;
  double lr = 3e-3;
  std::vector<std::uint64_t> seeds{0};
  int threads = 0;  // 0: every core
  std::vector<ClientSpec> clients;
  double heldout_fraction = 0.1;
  std::int64_t eval_bytes = 0;  // held-out bytes evaluated per group; 0: all of them
  ProxySpec proxy;
  DistillSpec distill;
  std::vector<Method> methods;
};

// "largest_alone", "central", "heterofl", "fedrolex", "kd", "hybrid".
const char* method_name(Method method);

// Reads and checks an experiment file: types and ranges, client names unique, every width
// keeping at least one whole KV group (kv_heads x width >= 1) and one layer, data files that
// exist, a proxy for kd and hybrid. Throws Error naming the file and the key or client.
Experiment read_experiment(const std::filesystem::path& file);

// The same from JSON text; `file` names it in errors and anchors relative data paths.
Experiment parse_experiment(const std::string& text, const std::filesystem::path& file);

}  // namespace edgefuse::lab

// edgefuse/plan/schema.h — which axis each dimension of each named tensor belongs to.
//
// Width- and depth-sliced federated learning (HeteroFL, Diao et al. ICLR 2021; FedRolex, Alam
// et al. NeurIPS 2022; FjORD, Horvath et al. NeurIPS 2021; DepthFL, Kim et al. ICLR 2023)
// cuts every client's model out of the target along a few named *axes*: the hidden size, the
// attention heads, the KV heads, the MLP width, the vocabulary and the layers
// A schema binds every dimension of every tensor to one axis or to none
// (never sliced), so that one index list per axis slices the whole model consistently: the
// chaining rule (a layer's input list is its producer's output list)
// holds by construction because both dimensions name the same axis.
//
// An axis has a size N (indices 0..N-1) and a group g: each index covers g consecutive
// elements of a bound dimension (a head covers head_dim rows). A binding may repeat its axis
// r times along one dimension ("3*heads": GPT-2's packed q|k|v columns), so a bound dimension
// has r*N*g elements and index i of repeat p covers elements p*N*g + i*g .. + g-1.
// Tensor names may contain one "{layer}", which binds the layer axis (named "layers").
// When a schema has axes named "heads" and "kv_heads", plans keep grouped-query attention
// consistent (plan.h).
//
//   auto schema = edgefuse::Schema::from_json(text, "schema.json");
//   auto layout = schema.bind(edgefuse::tensor_metas(checkpoint));  // checks every tensor
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "edgefuse/core/tensor.h"

namespace edgefuse {

class Checkpoint;

inline constexpr const char* kLayerAxis = "layers";

struct Axis {
  std::string name;
  std::uint64_t size = 0;   // number of indices; 0 for "layers" means "count them"
  std::uint64_t group = 1;  // elements of a bound dimension per index
};

// One dimension's binding: axis index into Schema::axes(), or kNoAxis (never sliced).
struct DimBinding {
  static constexpr int kNoAxis = -1;
  int axis = kNoAxis;
  std::uint32_t repeat = 1;
};

// A schema entry: a name pattern (with at most one "{layer}") and one binding per dimension.
struct TensorRule {
  std::string pattern;
  std::vector<DimBinding> dims;
};

// Name, dtype and shape of a tensor, without its data.
struct TensorMeta {
  std::string name;
  DType dtype = DType::kF32;
  Shape shape;
};

// The metas of every tensor of a checkpoint, in its order.
std::vector<TensorMeta> tensor_metas(const Checkpoint& checkpoint);

// Hugging Face config.json fields the presets need (0 = not given).
struct ModelConfig {
  std::string model_type;          // "llama", "mistral", "qwen2", "gpt2", ...
  std::uint64_t hidden = 0;        // hidden_size / n_embd
  std::uint64_t layers = 0;        // num_hidden_layers / n_layer
  std::uint64_t heads = 0;         // num_attention_heads / n_head
  std::uint64_t kv_heads = 0;      // num_key_value_heads (default: heads)
  std::uint64_t head_dim = 0;      // head_dim (default: hidden / heads)
  std::uint64_t intermediate = 0;  // intermediate_size / n_inner (gpt2 default 4*n_embd)
  std::uint64_t vocab = 0;         // vocab_size
  std::uint64_t positions = 0;     // n_positions (gpt2)
  bool tied_embeddings = false;    // tie_word_embeddings
};

// Parses a config.json. Throws Error naming `label` and the field for missing or invalid
// fields (positive integers; heads divisible by kv_heads).
ModelConfig parse_model_config(std::string_view json_text, const std::string& label);

// The tensors the "llama" preset expects for `config`, in HF order (embeddings; per layer q, k,
// v, o, gate, up, down, the two norms; final norm; lm_head unless the embeddings are tied), all
// of `dtype`: a synthetic target for simulations, benchmarks and tests. Throws Error like
// Schema::preset for a config lacking a field.
std::vector<TensorMeta> llama_tensor_metas(const ModelConfig& config, DType dtype);

class ModelLayout;

class Schema {
 public:
  // {"axes": {"<axis>": {"size": N, "group": G?}}, "tensors": {"<pattern>": [binding...]}}
  // where a binding is "<axis>", "<r>*<axis>" or null. "layers" may be omitted from "axes"
  // (its size is then counted when binding) and is never a dimension binding. Throws Error
  // naming `label` for unknown keys, unknown axes, sizes that are not positive integers,
  // more than one "{layer}" in a pattern, or two patterns that are equal.
  static Schema from_json(std::string_view json_text, const std::string& label);

  // Presets sized from a model config: "llama" (also Mistral, Qwen2 and other HF decoders
  // with q/k/v/o_proj, gate/up/down_proj and RMSNorm; lm_head optional, so tied embeddings
  // work) and "gpt2" (HF GPT-2, Conv1D weights stored [in, out], with or without the
  // "transformer." prefix). Throws Error for an unknown name or a config lacking a field.
  static Schema preset(std::string_view name, const ModelConfig& config);

  // The "mlp" preset for a stack of Linear layers "<prefix>.weight" [out, in] with optional
  // "<prefix>.bias" [out], ordered by the numbers in their names (fc1 < fc2 < fc10): the output
  // of layer i and the input of layer i+1 share axis "hidden<i>"; the network input and the
  // last layer's output are never sliced.
  static Schema mlp(const std::vector<TensorMeta>& tensors);

  const std::vector<Axis>& axes() const noexcept { return axes_; }
  const std::vector<TensorRule>& rules() const noexcept { return rules_; }
  // Index of the axis, or -1.
  int find_axis(std::string_view name) const noexcept;
  // The schema as JSON text in the from_json format.
  std::string to_json() const;

  // Checks a model against the schema: every tensor matches exactly one rule, with the
  // rule's rank and every bound dimension of size repeat*size*group; every {layer} value is
  // below the layer axis size. Throws Error naming the tensor and the rule broken.
  ModelLayout bind(const std::vector<TensorMeta>& tensors) const;

 private:
  friend class ModelLayout;
  std::vector<Axis> axes_;
  std::vector<TensorRule> rules_;
};

// A model bound to a schema: for every tensor its rule and layer. Axis sizes are final (the
// layer count is filled in).
class ModelLayout {
 public:
  struct Tensor {
    TensorMeta meta;
    std::size_t rule = 0;     // index into schema().rules()
    std::int64_t layer = -1;  // value of {layer}, or -1
  };

  const Schema& schema() const noexcept { return schema_; }
  const std::vector<Axis>& axes() const noexcept { return schema_.axes_; }
  const std::vector<Tensor>& tensors() const noexcept { return tensors_; }
  const Tensor* find(std::string_view name) const noexcept;
  // Pattern with "{layer}" replaced by `layer`.
  static std::string name_for(const TensorRule& rule, std::int64_t layer);

  const TensorRule& rule_of(const Tensor& t) const noexcept { return schema_.rules_[t.rule]; }
  std::uint64_t axis_size(int axis) const noexcept { return schema_.axes_[axis].size; }

 private:
  friend class Schema;
  ModelLayout() = default;
  Schema schema_;
  std::vector<Tensor> tensors_;
};

}  // namespace edgefuse

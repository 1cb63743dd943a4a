// libFuzzer target for the safetensors header parser: any bytes
// must end in a parsed header or a CheckpointError. Any other exception escapes and is
// reported as a crash, as are sanitizer findings (built with address and undefined).
#include <cstddef>
#include <cstdint>

#include "edgefuse/io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const edgefuse::SafetensorsHeader h = edgefuse::parse_safetensors(data, size, "fuzz");
    // A header that passed must describe bytes inside the input: touch each tensor's ends.
    volatile std::uint8_t sink = 0;
    for (const auto& t : h.tensors) {
      if (t.nbytes() > 0) {
        sink = sink ^ data[h.data_offset() + t.begin] ^ data[h.data_offset() + t.end - 1];
      }
    }
  } catch (const edgefuse::CheckpointError&) {
  }
  return 0;
}

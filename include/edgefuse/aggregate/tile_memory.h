// edgefuse/aggregate/tile_memory.h — the memory model of the aggregator's tile buffers, one
// for every driver (the fusion engine, the simulator) that sizes them from a budget.
//
// Each thread holds one tile buffer: per element an f32 sum, an f32 weight and a u32
// contributor count (12 bytes), and with row-generated clients (Aggregator::add_rows) one
// more f32 for the rows a client makes for the tile (16 bytes).
#pragma once

#include <cstddef>
#include <cstdint>

namespace edgefuse {

// The largest tile (64 Ki elements: the sums mostly stay in L2, and per-tile set-up is
// amortised; aggregate_bench measures the choice) and the smallest a budget may leave.
inline constexpr std::size_t kMaxTileElements = std::size_t{1} << 16;
inline constexpr std::size_t kMinTileElements = 4096;

constexpr std::uint64_t tile_bytes_per_element(bool generated_rows) noexcept {
  return generated_rows ? 16 : 12;
}

// Tile elements for `threads` threads sharing `tile_budget` bytes: as many as fit, at most
// kMaxTileElements. A result below kMinTileElements means the budget is too small.
constexpr std::size_t tile_elements_for(std::uint64_t tile_budget, std::size_t threads,
                                        bool generated_rows) noexcept {
  const std::uint64_t fit =
      tile_budget / (threads ? threads : 1) / tile_bytes_per_element(generated_rows);
  return static_cast<std::size_t>(fit < kMaxTileElements ? fit : kMaxTileElements);
}

}  // namespace edgefuse

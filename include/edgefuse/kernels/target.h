// edgefuse/kernels/target.h — which SIMD target the kernels dispatch to.
//
// The kernels are compiled for every x86 (or Arm) target Google Highway can attain and pick
// one at run time, once per call (HWY_DYNAMIC_DISPATCH). This names the one they pick now,
// for benchmark labels and the demo's report.
#pragma once

namespace edgefuse {

// "AVX3_DL", "AVX3", "AVX2", "SSE4", "SSSE3", "EMU128", ... (Highway's target names).
const char* simd_target_name();

}  // namespace edgefuse

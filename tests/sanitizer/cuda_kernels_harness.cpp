// The CUDA kernels (csrc/crepa_cuda_kernels.cu, HIP CPU build) without torch, for AddressSanitizer and
// UndefinedBehaviorSanitizer: every buffer is a heap block of exactly its size, so one element read or written past
// a row, a chunk or a tensor is reported. tests/test_cuda_sanitizers.py builds it, writes the inputs, runs it, and
// compares what it writes with the float64 reference.
//
//   harness DIR B F N D NEIGHBORS CUMULATIVE EPS DTYPE OFFSET GRID_LIMIT
//
// DIR/proj.bin, DIR/target.bin: [B, F, N, D] contiguous, in DTYPE (f32, f64, bf16, f16), placed OFFSET elements into
// their heap blocks (a multiple of 8 keeps rows 16-byte aligned when D % 8 == 0: the vector path; else the element
// path); DIR/grad_loss.bin: [B, F] and DIR/coefficients.bin: the [F, W] coefficient table, both in the accumulation
// type (the table in a block of exactly its size, so a read past it is reported too). Writes DIR/loss.bin, stats.bin, grad_proj.bin,
// grad_target.bin. GRID_LIMIT > 0 caps the blocks per launch (the several-launch path).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "crepa_cuda_kernels.cu"

namespace crepa {
namespace {
int64_t grid_cap = kCudaMaxGridX;
}  // namespace
int64_t cuda_grid_limit() { return grid_cap; }
void set_cuda_grid_limit(int64_t blocks) { grid_cap = blocks == 0 ? kCudaMaxGridX : blocks; }
bool cuda_launches_reversed() { return false; }
void set_cuda_launches_reversed(bool) {}
}  // namespace crepa

namespace {

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "harness: %s\n", what.c_str());
  std::exit(2);
}

// A heap block of exactly `elements` elements of `bytes` each, read from `path` after `offset` elements.
std::unique_ptr<unsigned char[]> read_block(const std::string& path, int64_t elements, int64_t bytes, int64_t offset) {
  std::unique_ptr<unsigned char[]> block(new unsigned char[(elements + offset) * bytes]);
  std::ifstream file(path, std::ios::binary);
  if (!file.read(reinterpret_cast<char*>(block.get() + offset * bytes), elements * bytes)) fail("cannot read " + path);
  return block;
}

void write_block(const std::string& path, const void* data, int64_t bytes) {
  std::ofstream file(path, std::ios::binary);
  if (!file.write(static_cast<const char*>(data), bytes)) fail("cannot write " + path);
}

template <typename acc_t>
std::unique_ptr<acc_t[]> nan_block(int64_t elements) {  // a kernel that skips an element leaves a NaN
  std::unique_ptr<acc_t[]> block(new acc_t[elements]);
  for (int64_t i = 0; i < elements; ++i) block[i] = std::numeric_limits<acc_t>::quiet_NaN();
  return block;
}

void check(cudaError_t error, const char* what) {
  if (error != cudaSuccess) fail(std::string(what) + ": " + cudaGetErrorString(error));
}

template <typename acc_t>
int run(const std::string& dir, int64_t B, int64_t F, int64_t N, int64_t D, const crepa::Band& band, double eps,
        crepa::Dtype dtype, int64_t element_bytes, int64_t offset) {
  const int64_t numel = B * F * N * D, S = band.stats_per_frame();
  auto proj_block = read_block(dir + "/proj.bin", numel, element_bytes, offset);
  auto target_block = read_block(dir + "/target.bin", numel, element_bytes, offset);
  auto grad_loss = read_block(dir + "/grad_loss.bin", B * F, sizeof(acc_t), 0);
  auto table = read_block(dir + "/coefficients.bin", F * band.width(), sizeof(acc_t), 0);
  const acc_t* coefficients = reinterpret_cast<const acc_t*>(table.get());
  const crepa::Strided proj{proj_block.get() + offset * element_bytes, {F * N * D, N * D, D, 1}, dtype};
  const crepa::Strided target{target_block.get() + offset * element_bytes, {F * N * D, N * D, D, 1}, dtype};
  const bool vector = D % crepa::kCudaChunk == 0 && (offset * element_bytes) % 16 == 0;

  auto loss = nan_block<acc_t>(B * F);
  auto stats = nan_block<acc_t>(B * N * F * S);
  auto token_similarity = nan_block<acc_t>(B * N * F);
  const crepa::ForwardLaunch<acc_t> forward{proj, target, B, N, D, band, coefficients, static_cast<acc_t>(eps),
                                            vector, stats.get(), token_similarity.get(), loss.get()};
  check(crepa::launch_forward(forward, 0, nullptr), "forward");

  // gradients in the inputs' dtype, NaN-filled (all-ones bit patterns are NaN in every float format)
  std::unique_ptr<unsigned char[]> grad_proj(new unsigned char[numel * element_bytes]);
  std::unique_ptr<unsigned char[]> grad_target(new unsigned char[numel * element_bytes]);
  std::memset(grad_proj.get(), 0xff, numel * element_bytes);
  std::memset(grad_target.get(), 0xff, numel * element_bytes);
  const crepa::Strided grad_proj_view{grad_proj.get(), {F * N * D, N * D, D, 1}, dtype};
  const crepa::Strided grad_target_view{grad_target.get(), {F * N * D, N * D, D, 1}, dtype};
  const crepa::BackwardLaunch<acc_t> backward{reinterpret_cast<const acc_t*>(grad_loss.get()), proj, target,
                                              stats.get(), B, N, D, band, coefficients,
                                              static_cast<acc_t>(eps), vector, grad_proj_view, grad_target_view,
                                              true, true};
  check(crepa::launch_backward(backward, 0, nullptr), "backward");

  write_block(dir + "/loss.bin", loss.get(), B * F * sizeof(acc_t));
  write_block(dir + "/stats.bin", stats.get(), B * N * F * S * sizeof(acc_t));
  write_block(dir + "/grad_proj.bin", grad_proj.get(), numel * element_bytes);
  write_block(dir + "/grad_target.bin", grad_target.get(), numel * element_bytes);
  std::printf("%s path\n", vector ? "vector" : "element");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 12) fail("usage: harness DIR B F N D NEIGHBORS CUMULATIVE EPS DTYPE OFFSET GRID_LIMIT");
  const std::string dir = argv[1];
  const int64_t B = std::atoll(argv[2]), F = std::atoll(argv[3]), N = std::atoll(argv[4]), D = std::atoll(argv[5]);
  const crepa::Band band = crepa::Band::make(F, std::atoll(argv[6]), std::atoi(argv[7]) != 0);
  const double eps = std::atof(argv[8]);
  const std::string dtype = argv[9];
  const int64_t offset = std::atoll(argv[10]);
  crepa::set_cuda_grid_limit(std::atoll(argv[11]));
  crepa::emulated::set_current_device(crepa::emulated::add_device(227 * 1024, 1024));  // sm_90
  if (dtype == "f32") return run<float>(dir, B, F, N, D, band, eps, crepa::Dtype::kFloat, 4, offset);
  if (dtype == "f64") return run<double>(dir, B, F, N, D, band, eps, crepa::Dtype::kDouble, 8, offset);
  if (dtype == "bf16") return run<float>(dir, B, F, N, D, band, eps, crepa::Dtype::kBFloat16, 2, offset);
  if (dtype == "f16") return run<float>(dir, B, F, N, D, band, eps, crepa::Dtype::kHalf, 2, offset);
  fail("unknown dtype " + dtype);
}

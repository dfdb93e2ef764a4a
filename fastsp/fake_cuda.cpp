// Fake CUDA for a CPU-only torch build: what fastsp.dryrun needs so that FakeTensorMode can run
// a whole training step on tensors that claim device "cuda" (no memory, no kernels, no driver).
//
// A CPU-only libtorch registers nothing for CUDA, and three of its paths stop a step:
//   - a CUDA device guard: indexing a CUDA tensor (t[:, None]) and the autograd engine's device
//     threads switch devices through c10::impl::getDeviceGuardImpl(CUDA);
//   - CUDA hooks: the autograd engine and torch.Generator(device="cuda") ask
//     at::detail::getCUDAHooks(), which falls back to hooks that throw;
//   - a CUDA generator: the step draws its noise from a torch.Generator on its device.
// Each registration below is the least that makes those calls succeed: one device (cuda:0), its
// default stream, hooks that say "built, not available" (so torch.cuda.is_available() stays
// False and nothing tries to reach a driver), and a generator that stores its seed and offset.
//
// getCUDAHooks() reads the registry once, at its first call, so this library must be loaded
// before torch initialises (fastsp.dryrun loads it with RTLD_GLOBAL before `import torch`).
// Built by torch.utils.cpp_extension at the first dry run and cached (fastsp.dryrun).

#include <ATen/core/Generator.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/GeneratorImpl.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

namespace at {  // Registry.h: a CUDAHooksRegistry class must live in namespace at
namespace fastsp_fake_cuda {

const Device kDevice(DeviceType::CUDA, 0);

struct FakeGuard final : c10::impl::DeviceGuardImplInterface {
  DeviceType type() const override { return DeviceType::CUDA; }
  Device exchangeDevice(Device) const override { return kDevice; }
  Device getDevice() const override { return kDevice; }
  void setDevice(Device) const override {}
  void uncheckedSetDevice(Device) const noexcept override {}
  Stream getStream(Device) const noexcept override { return Stream(Stream::DEFAULT, kDevice); }
  Stream exchangeStream(Stream) const noexcept override {
    return Stream(Stream::DEFAULT, kDevice);
  }
  DeviceIndex deviceCount() const noexcept override { return 1; }
};
C10_REGISTER_GUARD_IMPL(CUDA, FakeGuard);

// Fake tensors draw no random numbers: the generator only has to exist and keep its seed.
struct FakeGenerator final : c10::GeneratorImpl {
  FakeGenerator() : c10::GeneratorImpl(kDevice, DispatchKeySet(DispatchKey::CUDA)) {}
  void set_current_seed(uint64_t seed) override { seed_ = seed; }
  void set_offset(uint64_t offset) override { offset_ = offset; }
  uint64_t get_offset() const override { return offset_; }
  uint64_t current_seed() const override { return seed_; }
  uint64_t seed() override { return seed_; }
  void set_state(const c10::TensorImpl&) override {
    TORCH_CHECK(false, "the dry run's fake CUDA generator has no state to set");
  }
  c10::intrusive_ptr<c10::TensorImpl> get_state() const override {
    TORCH_CHECK(false, "the dry run's fake CUDA generator has no state to get");
  }

 private:
  FakeGenerator* clone_impl() const override {
    auto copy = new FakeGenerator();
    copy->seed_ = seed_;
    copy->offset_ = offset_;
    return copy;
  }
  uint64_t seed_ = 0;
  uint64_t offset_ = 0;
};

// Named CUDAHooks: getCUDAHooks() creates the registry entry of that name.
struct CUDAHooks final : CUDAHooksInterface {
  explicit CUDAHooks(CUDAHooksArgs) {}
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return false; }
  bool hasPrimaryContext(DeviceIndex) const override { return false; }
  const Generator& getDefaultGenerator(DeviceIndex) const override {
    static Generator generator = make_generator<FakeGenerator>();
    return generator;
  }
  Generator getNewGenerator(DeviceIndex) const override {
    return make_generator<FakeGenerator>();
  }
};
REGISTER_CUDA_HOOKS(CUDAHooks);

}  // namespace fastsp_fake_cuda
}  // namespace at

// Loads the AOTInductor package written by export_model.py and runs it from C++. The package calls
// flash_attn2::fwd through the dispatcher, so the program links the op library (flash_attn2::flash_attn2), and
// compares with the eager PyTorch output saved beside the package.
//   aoti_deploy DIR   (DIR holds model.pt2, input.bin, expected.bin)
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "flash_attn2/flash_attn2.h"

namespace {

// Reads "d0 d1 ...\n" followed by float32 data.
at::Tensor read_raw(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::string header;
  std::getline(in, header);
  std::istringstream dims(header);
  std::vector<int64_t> shape;
  for (int64_t d; dims >> d;) shape.push_back(d);
  at::Tensor t = at::empty(shape, at::kFloat);
  in.read(reinterpret_cast<char*>(t.data_ptr<float>()), static_cast<std::streamsize>(t.numel() * sizeof(float)));
  if (!in) throw std::runtime_error("short read from " + path);
  return t;
}

}  // namespace

int main(int argc, char** argv) try {
  const std::string dir = argc > 1 ? argv[1] : ".";
  torch::NoGradGuard no_grad;
  torch::inductor::AOTIModelPackageLoader loader(dir + "/model.pt2");
  const at::Tensor x = read_raw(dir + "/input.bin"), expected = read_raw(dir + "/expected.bin");
  const std::vector<at::Tensor> outputs = loader.run({x});
  if (outputs.empty() || outputs[0].sizes() != expected.sizes()) {
    std::cerr << "aoti_deploy: the package returned " << (outputs.empty() ? "nothing" : "shape ")
              << (outputs.empty() ? at::IntArrayRef() : outputs[0].sizes()) << ", expected " << expected.sizes()
              << std::endl;
    return 1;
  }
  const double err = (outputs.at(0) - expected).abs().max().item<double>();
  std::cout << "AOTInductor package output " << outputs.at(0).sizes() << ", max |difference| from eager " << err
            << std::endl;
  if (!(err < 1e-4)) {
    std::cerr << "aoti_deploy: the deployed model disagrees with eager PyTorch" << std::endl;
    return 1;
  }
  return 0;
} catch (const std::exception& e) {
  std::cerr << "aoti_deploy: " << e.what() << std::endl;
  return 1;
}

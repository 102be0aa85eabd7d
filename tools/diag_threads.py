import time, torch, concurrent.futures, os
print("cores", os.cpu_count(), "main threads", torch.get_num_threads(), "OMP", os.environ.get("OMP_NUM_THREADS"))
n = 50_000_000
p = torch.zeros(n); p.grad = torch.randn(n)
opt = torch.optim.AdamW([p], lr=1e-4, fused=True); opt.step()
def bench():
    t = time.perf_counter()
    for _ in range(3): opt.step()
    return n*3/(time.perf_counter()-t)/1e9, torch.get_num_threads()
print("main", bench())
ex = concurrent.futures.ThreadPoolExecutor(1)
print("worker", ex.submit(bench).result())
def bench2():
    torch.set_num_threads(os.cpu_count()); return bench()
print("worker set", ex.submit(bench2).result())
g = torch.randn(n).bfloat16(); s = torch.empty(n); w = torch.empty(n, dtype=torch.bfloat16, pin_memory=torch.cuda.is_available())
t=time.perf_counter(); s.copy_(g); print("bf16->fp32 copy GB/s", n*6/(time.perf_counter()-t)/1e9)
t=time.perf_counter(); w.copy_(s); print("fp32->bf16 pinned copy GB/s", n*6/(time.perf_counter()-t)/1e9)
t=time.perf_counter(); float(torch.linalg.vector_norm(s)); print("norm GB/s", n*4/(time.perf_counter()-t)/1e9)

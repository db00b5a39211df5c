/*
 * KVM probe firmware (see accel.ts): a 64 KiB BIOS image for `-bios` that goes from the reset
 * vector to 64-bit long mode with identity-mapped 2 MiB pages, writes and reads back three
 * pages, then writes 0x2a to isa-debug-exit (port 0xf4) on success, 0x13 on a mismatch.
 * accel.ts embeds the assembled bytes; to regenerate them:
 *   as --64 -o probe.o kvm-probe.S && ld -Ttext=0 --oformat binary -o probe.bin probe.o
 *   xxd -p -l 0x10e probe.bin      # code; the reset vector is the 5 bytes at 0xfff0
 */
.code16
.text
start:
  cli
  xor %ax, %ax
  mov %ax, %ds
  mov %ax, %es
  mov %ax, %ss
  mov $0x7000, %sp
  mov $0x1000, %di
  xor %eax, %eax
  mov $0xc00, %cx
  cld
  rep stosl
  movl $0x2003, 0x1000
  movl $0x3003, 0x2000
  movl $0x000083, 0x3000
  movl $0x200083, 0x3008
  movl $0x400083, 0x3010
  movl $0x600083, 0x3018
  mov $0xf000, %ax
  mov %ax, %ds
  lgdtl gdt_ptr
  xor %ax, %ax
  mov %ax, %ds
  mov %cr4, %eax
  or $0x20, %eax
  mov %eax, %cr4
  mov $0x1000, %eax
  mov %eax, %cr3
  mov $0xC0000080, %ecx
  rdmsr
  or $0x100, %eax
  wrmsr
  mov %cr0, %eax
  or $0x80000001, %eax
  mov %eax, %cr0
  ljmpl $0x08, $(0xF0000 + long_entry)
.code64
long_entry:
  mov $0x10, %ax
  mov %ax, %ds
  mov %ax, %es
  mov %ax, %ss
  movabs $0x5a5a5a5a12345678, %rax
  mov $0x200000, %edi
  mov %rax, (%rdi)
  mov $0x400000, %edi
  mov %rax, (%rdi)
  mov $0x600000, %edi
  mov %rax, (%rdi)
  mov $0x200000, %edi
  cmp (%rdi), %rax
  jne fail
  mov $0x400000, %edi
  cmp (%rdi), %rax
  jne fail
  mov $0x600000, %edi
  cmp (%rdi), %rax
  jne fail
  mov $0x2a, %al
  out %al, $0xf4
fail:
  mov $0x13, %al
  out %al, $0xf4
1:
  hlt
  jmp 1b
.balign 8
gdt:
  .quad 0
  .quad 0x00209a0000000000
  .quad 0x0000920000000000
gdt_end:
gdt_ptr:
  .word gdt_end - gdt - 1
  .long 0xF0000 + gdt
.code16
.org 0xfff0
reset:
  ljmp $0xf000, $start
.org 0xffff
  .byte 0

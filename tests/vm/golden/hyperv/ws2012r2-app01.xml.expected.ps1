# polyvisor: Hyper-V import script for 'APP01' (generation 1).
# Run it in an elevated PowerShell on the Hyper-V host; the disks are the files beside it.
$ErrorActionPreference = 'Stop'
$here = Split-Path -Parent $MyInvocation.MyCommand.Path
$vm = New-VM -Name 'APP01' -Generation 1 -MemoryStartupBytes 4294967296 -NoVHD -Path $here
Set-VMProcessor -VM $vm -Count 4
Set-VMMemory -VM $vm -DynamicMemoryEnabled $false -StartupBytes 4294967296
Set-VM -VM $vm -Notes 'Line-of-business app server | polyvisor-os: family=other arch=x86_64'
Add-VMScsiController -VM $vm
Add-VMHardDiskDrive -VM $vm -ControllerType IDE -ControllerNumber 0 -ControllerLocation 0 -Path (Join-Path $here 'APP01-system.vhdx')
Add-VMDvdDrive -VM $vm -ControllerType IDE -ControllerNumber 1 -ControllerLocation 0
Add-VMHardDiskDrive -VM $vm -ControllerType SCSI -ControllerNumber 0 -ControllerLocation 0 -Path (Join-Path $here 'APP01-data.vhdx')
Get-VMNetworkAdapter -VM $vm | Remove-VMNetworkAdapter
Add-VMNetworkAdapter -VM $vm -Name 'Network Adapter 1' -StaticMacAddress '00155D0107DC'
Connect-VMNetworkAdapter -VMName 'APP01' -Name 'Network Adapter 1' -SwitchName 'External LAN'
Set-VMBios -VM $vm -StartupOrder @('IDE', 'CD', 'LegacyNetworkAdapter', 'Floppy')
Set-VMComPort -VM $vm -Number 1 -Path '\\.\pipe\APP01-com1'
